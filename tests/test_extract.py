"""Activation extraction (auditor/extract.py) against hand-written forward passes."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from auditor.tasks import extract as extract_module
from auditor.errors import ArchitectureError, DataError, Remedy, StoreError, UsageError
from auditor.tasks.extract import extract_activations, resolve_device, resolve_stages
from auditor.io.images import ImageDataset, PRESETS, resolve_preprocessing, scan_image_folder, select_samples
from auditor.io.store import open_store
from auditor.models.anatomy import Anatomy, StageSpec, analyze_anatomy

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data"
CIFAR_200 = SHARED / "images" / "cifar10-test-200"
RESNET20 = SHARED / "checkpoints" / "cifar10-resnet20-akamaster.th"
needs_shared = pytest.mark.skipif(
    not (CIFAR_200.is_dir() and RESNET20.is_file()), reason=f"{SHARED} (CIFAR images, ResNet-20) is absent"
)
# The akamaster checkpoints were trained with ImageNet statistics at 32 px (shared/data/README.md).
AKAMASTER = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _make_folder(root: Path, counts: dict[str, int], size: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i:03d}.png")
    return root


class _InPlace(nn.Module):
    """conv -> in-place ReLU: the ReLU overwrites the conv's output tensor."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.conv(x) * self.scale if self.scale != 1.0 else self.conv(x))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _tiny_anatomy(size: int = 8) -> Anatomy:
    return Anatomy(
        (3, size, size), (), (),
        (StageSpec("conv", "conv", "output", (4, size, size)), StageSpec("act", "act", "output", (4, size, size))),
        StageSpec("penultimate", "fc", "input", (4,)),
    )


def _tiny_dataset(root: Path, counts: dict[str, int] | None = None) -> ImageDataset:
    _make_folder(root, counts or {"a": 3, "b": 3})
    return ImageDataset(select_samples(scan_image_folder(root)), PRESETS["none"])


def _extract(model: nn.Module, dataset: ImageDataset, out: Path, **kw) -> object:
    kw.setdefault("batch_size", 2)
    return extract_activations(
        model, kw.pop("anatomy", _tiny_anatomy(dataset.input_shape[1])), dataset, out,
        checkpoint_sha256="00" * 32, arch="tiny", **kw,
    )


# --------------------------------------------------------------------------- real ResNet-20


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    if not RESNET20.is_file():
        pytest.skip(f"{RESNET20} is absent")
    from auditor.models.load import load_checkpoint, load_model

    return load_model(load_checkpoint(RESNET20)).model


def _by_hand(model: nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        stem = F.relu(model.bn1(model.conv1(images)))
        layer1 = model.layer1(stem)
        layer2 = model.layer2(layer1)
        layer3 = model.layer3(layer2)
        penultimate = torch.flatten(F.adaptive_avg_pool2d(layer3, 1), 1)
    return {
        "stem": stem.numpy(), "layer1": layer1.numpy(), "layer2": layer2.numpy(),
        "layer3": layer3.numpy(), "penultimate": penultimate.numpy(),
    }


@pytest.mark.slow
@needs_shared
@pytest.mark.shared
def test_resnet20_matches_hand_written_forward(resnet20: nn.Module, tmp_path: Path) -> None:
    pre = resolve_preprocessing("cifar10", **AKAMASTER)
    selection = select_samples(scan_image_folder(CIFAR_200), per_class=2, seed=7)
    dataset = ImageDataset(selection, pre)
    anatomy = analyze_anatomy(resnet20, dataset.input_shape)
    # the test's own preprocessing: PIL + numpy, /255, normalize
    mean, std = np.asarray(AKAMASTER["mean"], np.float32), np.asarray(AKAMASTER["std"], np.float32)
    images = np.ascontiguousarray(np.stack([  # NCHW in memory: channels-last rounds differently
        ((np.asarray(Image.open(CIFAR_200 / rel).convert("RGB"), np.float32) / np.float32(255) - mean) / std)
        .transpose(2, 0, 1) for rel, _ in selection.samples
    ]))
    batch = 8
    expected = [_by_hand(resnet20, torch.from_numpy(images[i:i + batch])) for i in range(0, len(images), batch)]
    expected = {k: np.concatenate([e[k] for e in expected]) for k in expected[0]}
    for dtype in ("float32", "float16"):
        out = tmp_path / f"{dtype}.h5"
        result = extract_activations(
            resnet20, anatomy, dataset, out, checkpoint_sha256="12" * 32, arch="resnet20",
            dtype=dtype, batch_size=batch,
        )
        assert result.samples == 20 and result.skipped == () and result.resumed_from == 0
        with open_store(out) as store:
            assert store.stage_names == ["stem", "layer1", "layer2", "layer3", "penultimate"]
            assert store.paths == [rel for rel, _ in selection.samples]
            assert store.labels.tolist() == [label for _, label in selection.samples]
            assert [store.classes[lab] for lab in store.labels] == [p.split("/")[0] for p in store.paths]
            for name, want in expected.items():
                got = store.stage(name)[()].astype(np.float32)
                assert got.shape == want.shape
                if dtype == "float32":
                    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)
                else:
                    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4, err_msg=name)
        # the stored penultimate features still classify like the network (92.5 % on all 200)
        with open_store(tmp_path / "float32.h5") as store:
            logits = resnet20.linear(torch.from_numpy(store.stage("penultimate")[()]))
            assert (logits.argmax(1).numpy() == store.labels).mean() >= 0.8


# --------------------------------------------------------------------------- hooks


def test_inplace_relu_does_not_leak_into_hooked_value(tmp_path: Path) -> None:
    dataset = _tiny_dataset(tmp_path / "data")
    model = _InPlace()
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        conv = model.conv(images).numpy()
    assert (conv < 0).any()
    _extract(model, dataset, tmp_path / "a.h5", batch_size=4)
    with open_store(tmp_path / "a.h5") as store:
        np.testing.assert_array_equal(store.stage("conv")[()], conv)
        np.testing.assert_array_equal(store.stage("act")[()], np.maximum(conv, 0))
        np.testing.assert_allclose(
            store.stage("penultimate")[()], np.maximum(conv, 0).mean(axis=(2, 3)), rtol=1e-5, atol=1e-7
        )


def test_inplace_test_detects_a_hook_without_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: a hook that keeps a reference sees the ReLU's result."""
    dataset = _tiny_dataset(tmp_path / "data")
    monkeypatch.setattr(extract_module, "_copy_into", lambda value, buffer: value.detach())
    _extract(_InPlace(), dataset, tmp_path / "a.h5", batch_size=6)
    with open_store(tmp_path / "a.h5") as store:
        assert (store.stage("conv")[()] >= 0).all()


# --------------------------------------------------------------------------- kill and resume

_OPTIONS = dict(checkpoint_sha256="ab" * 32, arch="resnet8", batch_size=2, dtype="float16", compression="lzf")
_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, sys.argv[4])
    from test_extract import _OPTIONS, _resnet8_job
    from auditor.tasks.extract import extract_activations

    def progress(done, total):
        if done >= int(sys.argv[3]):
            time.sleep(0.5)  # let the writer thread flush what is queued
            os.kill(os.getpid(), signal.SIGKILL)

    extract_activations(*_resnet8_job(sys.argv[1], sys.argv[2]), **_OPTIONS, progress=progress)
    """
)


def _resnet8_job(data: str | Path, out: str | Path) -> tuple:
    """Positional arguments of an extraction by a seeded ResNet-8 (same weights in every process)."""
    from auditor.models.registry import build_model

    torch.manual_seed(0)
    model, _ = build_model("resnet8")
    dataset = ImageDataset(select_samples(scan_image_folder(data), seed=1), PRESETS["cifar10"])
    return model, analyze_anatomy(model, dataset.input_shape), dataset, out


def _compare(a: Path, b: Path) -> None:
    """Every dataset and attribute equal, except the root attribute ``created``."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        keys = {k for k in fa.attrs if k != "created"}
        assert keys == {k for k in fb.attrs if k != "created"}
        for key in keys:
            assert np.array_equal(fa.attrs[key], fb.attrs[key]), key
        names: list[str] = []
        fa.visit(names.append)
        other: list[str] = []
        fb.visit(other.append)
        assert names == other
        for name in names:
            da, db = fa[name], fb[name]
            assert type(da) is type(db), name
            if isinstance(da, h5py.Dataset):
                assert (da.dtype, da.shape, da.chunks, da.compression) == (db.dtype, db.shape, db.chunks, db.compression)
                np.testing.assert_array_equal(da[()], db[()], err_msg=name)
            assert set(da.attrs) == set(db.attrs), name
            for key in da.attrs:
                assert np.array_equal(da.attrs[key], db.attrs[key]), (name, key)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path: Path) -> None:
    data = _make_folder(tmp_path / "data", {"x": 5, "y": 6}, size=32)
    (data / "y" / "005.png").write_bytes(b"corrupt")  # a skipped image in the mix
    whole, out = tmp_path / "whole.h5", tmp_path / "out.h5"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    killed = subprocess.run(  # SIGKILLs itself once 6 of 11 samples went through the network
        [sys.executable, "-c", _CHILD, str(data), str(out), "6", str(Path(__file__).parent)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    partial = tmp_path / "out.h5.partial"
    assert partial.exists() and not out.exists()
    with h5py.File(partial, "r") as f:
        written = int(f.attrs["written"])
        assert not f.attrs["complete"]
        assert 0 < written < 10
        assert f["stages/stem"].shape[0] >= written

    resumed = extract_activations(*_resnet8_job(data, out), **_OPTIONS)
    assert resumed.resumed_from >= written and resumed.samples == 10
    assert not partial.exists() and out.exists()
    uninterrupted = extract_activations(*_resnet8_job(data, whole), **_OPTIONS)
    assert uninterrupted.resumed_from == 0 and uninterrupted.samples == 10
    _compare(whole, out)
    with open_store(out) as store:
        assert [s["path"] for s in store.skipped] == ["y/005.png"]


def test_second_writer_refused(tmp_path: Path) -> None:
    dataset = _tiny_dataset(tmp_path / "data")
    fd = os.open(tmp_path / "out.h5.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(StoreError, match="another resdyn process is writing .*out.h5"):
            _extract(_InPlace(), dataset, tmp_path / "out.h5")
    finally:
        os.close(fd)
    assert not (tmp_path / "out.h5.partial").exists()
    result = _extract(_InPlace(), dataset, tmp_path / "out.h5")
    assert result.samples == 6
    with pytest.raises(StoreError, match="already exists"):
        _extract(_InPlace(), dataset, tmp_path / "out.h5")
    assert _extract(_InPlace(), dataset, tmp_path / "out.h5", overwrite=True).samples == 6


# --------------------------------------------------------------------------- bad images, bad values


def test_corrupt_image_skipped_or_strict(tmp_path: Path) -> None:
    data = tmp_path / "data"
    dataset = _tiny_dataset(data, {"a": 3, "b": 4})
    (data / "b" / "002.png").write_bytes(b"\x89PNG garbage bytes")
    calls: list[tuple[int, int]] = []
    result = _extract(_InPlace(), dataset, tmp_path / "s.h5", progress=lambda d, t: calls.append((d, t)))
    assert result.samples == 6
    assert result.skipped == ({"path": "b/002.png", "reason": result.skipped[0]["reason"]},)
    assert calls[0] == (0, 7) and calls[-1] == (7, 7)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    with open_store(tmp_path / "s.h5") as store:
        assert "b/002.png" not in store.paths and len(store.paths) == 6
        assert store.labels.tolist() == [0, 0, 0, 1, 1, 1]
        assert store.skipped[0]["path"] == "b/002.png" and store.skipped[0]["reason"]
    with pytest.raises(DataError, match="002.png: cannot read the image") as info:
        _extract(_InPlace(), dataset, tmp_path / "strict.h5", strict=True)
    assert info.value.remedy == Remedy("strict", False) and "strict=False" in info.value.one_line()
    assert not (tmp_path / "strict.h5").exists()


def test_image_of_another_size_is_an_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    dataset = _tiny_dataset(data)
    Image.new("RGB", (9, 8)).save(data / "b" / "002.png")
    with pytest.raises(DataError, match="one size"):
        _extract(_InPlace(), dataset, tmp_path / "o.h5")


def test_float16_overflow_detected(tmp_path: Path) -> None:
    dataset = _tiny_dataset(tmp_path / "data")
    anatomy = Anatomy((3, 8, 8), (), (), (StageSpec("act", "act", "output", (4, 8, 8)),), None)
    with pytest.raises(StoreError, match=r"'act'.*\|x\| = .*e\+0[5-7]") as info:
        _extract(_InPlace(scale=1e6), dataset, tmp_path / "h.h5", dtype="float16", anatomy=anatomy)
    assert info.value.remedy == Remedy("dtype", "float32") and "bfloat16" in info.value.hint
    assert not (tmp_path / "h.h5").exists() and not (tmp_path / "h.h5.partial").exists()
    # the hint works as given: no --overwrite needed, nothing left in the way
    assert _extract(_InPlace(scale=1e6), dataset, tmp_path / "h.h5", dtype="float32", anatomy=anatomy).samples == 6
    for dtype in ("float32", "bfloat16"):
        result = _extract(_InPlace(scale=1e6), dataset, tmp_path / f"{dtype}.h5", dtype=dtype, anatomy=anatomy)
        assert result.samples == 6
    with open_store(tmp_path / "bfloat16.h5") as a, open_store(tmp_path / "float32.h5") as b:
        np.testing.assert_allclose(a.stage("act")[()], b.stage("act")[()], rtol=1e-2)


def test_nan_activations_refused(tmp_path: Path) -> None:
    dataset = _tiny_dataset(tmp_path / "data")
    model = _InPlace()
    with torch.no_grad():
        model.conv.bias[1] = float("nan")
    with pytest.raises(StoreError, match="'conv'.*NaN or inf"):
        _extract(model, dataset, tmp_path / "n.h5")


# --------------------------------------------------------------------------- arguments


def test_argument_checks(tmp_path: Path) -> None:
    dataset = _tiny_dataset(tmp_path / "data")
    model = _InPlace()
    for kwargs in [
        {"dtype": "float64"}, {"compression": "zstd"}, {"batch_size": 0}, {"workers": -1},
        {"device": "tpu"}, {"anatomy": _tiny_anatomy(16)}, {"stages": ["conv", "conv"]},
    ]:
        with pytest.raises(UsageError):
            _extract(model, dataset, tmp_path / "x.h5", **kwargs)
    with pytest.raises(ArchitectureError, match="unknown stage 'layer7'"):
        _extract(model, dataset, tmp_path / "x.h5", stages=["layer7"])
    wrong = Anatomy((3, 8, 8), (), (), (StageSpec("conv", "conv", "output", (5, 8, 8)),), None)
    with pytest.raises(ArchitectureError, match="shape"):
        _extract(model, dataset, tmp_path / "x.h5", anatomy=wrong)
    missing = Anatomy((3, 8, 8), (), (), (StageSpec("conv", "nope", "output", (4, 8, 8)),), None)
    with pytest.raises(ArchitectureError, match="no module 'nope'"):
        _extract(model, dataset, tmp_path / "x.h5", anatomy=missing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no partial, no lock left
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    names = [s.name for s in resolve_stages(_tiny_anatomy(), ["penultimate", "conv"])]
    assert names == ["penultimate", "conv"]


def test_stage_subset_and_workers(tmp_path: Path) -> None:
    dataset = _tiny_dataset(tmp_path / "data", {"a": 4, "b": 3})
    single = _extract(_InPlace(), dataset, tmp_path / "w0.h5", stages=["act"], batch_size=3)
    assert single.stages == ("act",)
    _extract(_InPlace(), dataset, tmp_path / "w2.h5", stages=["act"], batch_size=3, workers=2)
    with open_store(tmp_path / "w0.h5") as a, open_store(tmp_path / "w2.h5") as b:
        assert a.stage_names == ["act"]
        np.testing.assert_array_equal(a.stage("act")[()], b.stage("act")[()])
        assert a.paths == b.paths


@pytest.mark.parametrize(("batch_size", "sets"), [(6, 1), (4, 2), (1, 5)])
def test_buffer_sets_never_outnumber_the_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 batch_size: int, sets: int) -> None:
    """Each set holds a batch of every stage: a set no batch can fill is memory for nothing."""
    made = []
    original = extract_module._BufferPool.__init__

    def spy(self, specs, size, count, **kw):
        made.append(count)
        original(self, specs, size, count, **kw)

    monkeypatch.setattr(extract_module._BufferPool, "__init__", spy)
    dataset = _tiny_dataset(tmp_path / "data")  # 6 images
    _extract(_InPlace(), dataset, tmp_path / "acts.h5", batch_size=batch_size)
    assert made == [sets]
    with open_store(tmp_path / "acts.h5") as store:
        assert len(store.paths) == 6


# --------------------------------------------------------------------------- disk space (#27)


@pytest.mark.parametrize(("size", "counts", "dtype"), [(32, {"a": 12, "b": 12}, "float32"),
                                                        (16, {"a": 30, "b": 20}, "float16")])
def test_store_size_is_estimated_within_ten_percent(tmp_path: Path, size: int, counts: dict, dtype: str) -> None:
    _make_folder(tmp_path / "img", counts, size=size)
    dataset = ImageDataset(select_samples(scan_image_folder(tmp_path / "img")), PRESETS["none"])
    result = _extract(_InPlace(), dataset, tmp_path / "s.h5", dtype=dtype)
    written = (tmp_path / "s.h5").stat().st_size
    assert abs(result.estimated_bytes - written) <= 0.1 * written, (result.estimated_bytes, written)


def test_the_progress_line_is_told_the_estimate_before_the_first_image(tmp_path: Path) -> None:
    from auditor.tasks.bounds import size_text

    _make_folder(tmp_path / "img", {"a": 3, "b": 3}, size=16)
    dataset = ImageDataset(select_samples(scan_image_folder(tmp_path / "img")), PRESETS["none"])
    events: list = []

    def progress(done: int, total: int) -> None:
        events.append((done, total))

    progress.note = lambda text: events.append(text)  # type: ignore[attr-defined]
    result = _extract(_InPlace(), dataset, tmp_path / "s.h5", progress=progress)
    notes = [e for e in events if isinstance(e, str)]
    assert notes == [f"store about {size_text(result.estimated_bytes)}"]
    assert isinstance(events[0], str)  # before any image was counted


def test_a_folder_without_room_is_refused_before_the_first_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from auditor.errors import OutputError
    from auditor.tasks import store_space
    from conftest import run_cli

    asked = []
    monkeypatch.setattr(store_space, "free_bytes", lambda folder: asked.append(folder) or 1000)
    dataset = _tiny_dataset(tmp_path / "img")
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match=r"no room for the activation store: about .* for 6 images, 1.0 kB free"):
        _extract(_InPlace(), dataset, tmp_path / "out" / "s.h5")
    assert asked == [tmp_path / "out"] and list((tmp_path / "out").iterdir()) == []  # nothing written, no lock
    # The audit's scratch store: one line, exit 2, naming --cache.
    code, out, err = run_cli(["audit", REPO / "fixtures" / "resnet8-digits.safetensors", "--data",
                              REPO / "fixtures" / "digits", "--per-class", "2", "--no-progress"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert "no room for the activation store" in lines[0] and "Hint:" in lines[0] and "--cache" in lines[0]


def test_the_audit_progress_names_the_phase_of_the_store_estimate(tmp_path: Path) -> None:
    """The audit forwards the extraction's note with its phase, before that phase's first progress call."""
    from auditor.tasks.audit import AuditOptions, audit

    root = Path(__file__).resolve().parents[1] / "fixtures"
    events: list = []

    def progress(phase: str, done: int, total: int) -> None:
        events.append(("progress", phase))

    progress.note = lambda phase, text: events.append(("note", phase, text))  # type: ignore[attr-defined]
    report = audit(root / "resnet8-digits.safetensors", data=root / "digits", progress=progress,
                   options=AuditOptions(samples=4, power_iterations=1))
    notes = [e for e in events if e[0] == "note"]
    assert len(notes) == 1 and notes[0][1] == "extract" and notes[0][2].startswith("store about ")
    first_extract = events.index(("progress", "extract"))
    assert events.index(notes[0]) < first_extract  # named by the phase it belongs to, before its first count
    assert report.to_dict()["blocks"]  # the audit ran through
