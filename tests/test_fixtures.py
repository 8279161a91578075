"""The committed example in fixtures/ is complete and consistent with itself.

Fast: reads the committed files, never trains. ``fixtures/build.py`` makes them; the
PNG half of it is rebuilt twice here to check that it is deterministic.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from auditor.models.registry import build_model

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DIGITS = FIXTURES / "digits"
CHECKPOINTS = FIXTURES / "checkpoints"
MAIN_EXAMPLE = FIXTURES / "resnet8-digits.safetensors"
VARIANTS = ("resnet8", "resnet8_nobn", "resnet8_plain")
PER_CLASS = 30
REQUIRED_METADATA = {
    "arch", "num_classes", "epoch", "preprocessing", "preset", "dataset", "seed",
    "train_accuracy", "heldout_accuracy", "created_by",
}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def _epochs(arch: str) -> list[int]:
    found = []
    for path in (CHECKPOINTS / arch).glob("*.safetensors"):
        match = re.fullmatch(r"epoch-(\d{2})\.safetensors", path.name)
        assert match, f"unexpected file {path}"
        found.append(int(match.group(1)))
    return sorted(found)


def _all_checkpoints() -> list[Path]:
    return sorted(CHECKPOINTS.glob("*/epoch-*.safetensors")) + [MAIN_EXAMPLE]


def _load_images() -> tuple[np.ndarray, np.ndarray]:
    """Fixture images in class-then-name order: uint8 (N, 32, 32, 3) and labels."""
    images, labels = [], []
    for c in range(10):
        for path in sorted((DIGITS / str(c)).glob("*.png")):
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
            labels.append(c)
    return np.stack(images), np.asarray(labels)


def _load_build_module():
    spec = importlib.util.spec_from_file_location("resdyn_fixtures_build", FIXTURES / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_class_folders_and_counts():
    folders = sorted(p.name for p in DIGITS.iterdir() if p.is_dir())
    assert folders == [str(c) for c in range(10)]
    for c in range(10):
        files = sorted((DIGITS / str(c)).iterdir())
        assert len(files) == PER_CLASS, f"class {c}: {len(files)} files"
        assert all(re.fullmatch(r"\d{4}\.png", f.name) for f in files)
    # An image index (its place in sklearn's load_digits) appears in one class only.
    names = [f.name for f in DIGITS.glob("*/*.png")]
    assert len(names) == len(set(names)) == 10 * PER_CLASS


def test_pngs_are_32px_rgb_grayscale():
    for path in sorted(DIGITS.glob("*/*.png")):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32), path
            a = np.asarray(im)
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all(), path


@pytest.mark.parametrize("arch", VARIANTS)
def test_every_epoch_present(arch):
    epochs = _epochs(arch)
    assert epochs and epochs == list(range(epochs[-1] + 1)), epochs
    assert epochs[-1] >= 5
    assert epochs == _epochs(VARIANTS[0]), "all variants have the same epochs"


@pytest.mark.parametrize("path", _all_checkpoints(), ids=lambda p: str(p.relative_to(FIXTURES)))
def test_checkpoint_metadata_and_strict_load(path):
    state, meta = _read(path)
    assert REQUIRED_METADATA <= meta.keys()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["num_classes"] == "10"
    assert meta["preset"] == "none"
    assert meta["dataset"] == "sklearn-digits-32px"
    assert meta["created_by"] == "fixtures/build.py"
    if path != MAIN_EXAMPLE:
        assert meta["arch"] == path.parent.name
        assert int(meta["epoch"]) == int(path.stem.split("-")[1])
    prep = json.loads(meta["preprocessing"])
    assert prep["size"] == 32 and prep["resize"] is None
    assert len(prep["mean"]) == len(prep["std"]) == 3 and min(prep["std"]) > 0
    for key in ("train_accuracy", "heldout_accuracy"):
        assert 0.0 <= float(meta[key]) <= 1.0
    for key, tensor in state.items():
        assert tensor.is_contiguous()
        expected = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        assert tensor.dtype == expected, key
    model = build_model(meta["arch"], 10)[0]
    model.load_state_dict(state, strict=True)


def test_final_checkpoints_trained():
    last = _epochs("resnet8")[-1]
    for arch in VARIANTS:
        _, meta = _read(CHECKPOINTS / arch / f"epoch-{last:02d}.safetensors")
        assert float(meta["heldout_accuracy"]) > 0.85, arch
    assert MAIN_EXAMPLE.read_bytes() == (CHECKPOINTS / "resnet8" / f"epoch-{last:02d}.safetensors").read_bytes()


def test_main_example_reproduces_recorded_heldout_accuracy():
    """Recompute the stored held-out accuracy from the PNGs and the stored preprocessing."""
    state, meta = _read(MAIN_EXAMPLE)
    prep = json.loads(meta["preprocessing"])
    images, labels = _load_images()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(prep["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(prep["std"], dtype=torch.float32).view(1, 3, 1, 1)
    model = build_model(meta["arch"], 10)[0]
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        predicted = model((x - mean) / std).argmax(1).numpy()
    measured = float((predicted == labels).mean())
    assert measured == pytest.approx(float(meta["heldout_accuracy"]), abs=1e-6)
    assert measured > 0.85


@pytest.mark.slow
def test_build_images_is_deterministic(tmp_path):
    pytest.importorskip("sklearn")
    build = _load_build_module()
    digits = build.load_digits32()  # one load; the writes are what is compared

    def digest(folder: Path) -> dict[str, str]:
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))
        }

    build.build_images(tmp_path / "a", digits=digits)
    build.build_images(tmp_path / "b")  # and once from scratch
    first, second = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert len(first) == 10 * PER_CLASS
    assert first == second
    # ... and they are the committed images: same names, same pixels (pixels, not
    # bytes: another zlib build may compress the same image differently).
    assert sorted(first) == sorted(str(p.relative_to(DIGITS)) for p in DIGITS.rglob("*.png"))
    for name in first:
        with Image.open(tmp_path / "a" / name) as new, Image.open(DIGITS / name) as old:
            assert np.array_equal(np.asarray(new), np.asarray(old)), name
