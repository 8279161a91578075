"""Image folders, sample selection and preprocessing (auditor/io/images.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from auditor.errors import DataError, Remedy, UsageError
from auditor.io.images import (
    PRESETS,
    ImageDataset,
    ImageFailure,
    Preprocessing,
    collate_images,
    make_loader,
    resolve_preprocessing,
    scan_image_folder,
    select_samples,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CIFAR_200 = SHARED / "images" / "cifar10-test-200"
needs_cifar = pytest.mark.skipif(not CIFAR_200.is_dir(), reason=f"{CIFAR_200} is absent")


def _make_folder(root: Path, counts: dict[str, int], size: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def _expected(path: Path, mean: tuple, std: tuple) -> np.ndarray:
    x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / np.float32(255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return x.transpose(2, 0, 1)


# --------------------------------------------------------------------------- preprocessing


def test_presets() -> None:
    assert PRESETS["imagenet"].to_dict() == {
        "size": 224, "resize": 256, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]
    }
    assert PRESETS["cifar10"].size == 32 and PRESETS["cifar10"].resize is None
    assert PRESETS["none"].to_dict() == {"size": None, "resize": None, "mean": None, "std": None}
    assert json.loads(PRESETS["cifar10"].to_json())["std"] == [0.2471, 0.2435, 0.2616]


def test_resolve_precedence() -> None:
    meta = {"preprocessing": json.dumps({"size": 40, "resize": 48, "mean": [0.5] * 3, "std": [0.25] * 3})}
    assert resolve_preprocessing(default_preset="cifar10") == PRESETS["cifar10"]
    assert resolve_preprocessing() == PRESETS["imagenet"]
    from_meta = resolve_preprocessing(checkpoint_metadata=meta, default_preset="cifar10")
    assert (from_meta.size, from_meta.resize, from_meta.mean, from_meta.preset) == (40, 48, (0.5,) * 3, "checkpoint")
    # an explicit preset beats the metadata, explicit values beat both
    assert resolve_preprocessing("cifar10", checkpoint_metadata=meta) == PRESETS["cifar10"]
    mixed = resolve_preprocessing("cifar10", size=64, mean=(0.1, 0.2, 0.3), checkpoint_metadata=meta)
    assert (mixed.size, mixed.mean, mixed.std) == (64, (0.1, 0.2, 0.3), PRESETS["cifar10"].std)
    assert resolve_preprocessing(checkpoint_metadata={"preset": "none"}).preset == "none"
    partial = resolve_preprocessing(
        checkpoint_metadata={"preprocessing": json.dumps({"mean": [0, 0, 0], "std": [1, 1, 1]})},
        default_preset="cifar10",
    )
    assert (partial.size, partial.resize, partial.std) == (32, None, (1.0, 1.0, 1.0))
    assert resolve_preprocessing("none", mean="0.5, 0.25,1", std="1,2,4").std == (1.0, 2.0, 4.0)
    scaled = resolve_preprocessing("imagenet", size=160)
    assert (scaled.size, scaled.resize) == (160, 183)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"std": (1.0, 0.0, 1.0)},
        {"std": (1.0, -1.0, 1.0)},
        {"std": (1.0, float("nan"), 1.0)},
        {"mean": (0.1, 0.2)},
        {"mean": (0.1, float("inf"), 0.3)},
        {"mean": "abc"},
        {"std": "1,2"},
        {"size": 0},
        {"preset": "mnist"},
        {"preset": "none", "mean": (0.5, 0.5, 0.5)},
        {"checkpoint_metadata": {"preprocessing": "{not json"}},
        {"checkpoint_metadata": {"preprocessing": json.dumps({"size": 32, "crop": 3})}},
        {"checkpoint_metadata": {"preprocessing": json.dumps({"size": 32, "std": [1, 0, 1], "mean": [0, 0, 0]})}},
    ],
)
def test_resolve_refuses(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        resolve_preprocessing(**kwargs)


# --------------------------------------------------------------------------- scanning


def test_scan_layout(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"b": 2, "a": 3})
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"x")
    nested = tmp_path / "b" / "more"
    nested.mkdir()
    Image.new("RGB", (8, 8)).save(nested / "000.JPG")
    (tmp_path / "loose.png").write_bytes(b"ignored: not in a class folder")
    index = scan_image_folder(tmp_path)
    assert index.root == tmp_path.resolve()
    assert index.classes == ("a", "b")
    assert index.samples == (
        ("a/000.png", 0), ("a/001.png", 0), ("a/002.png", 0),
        ("b/000.png", 1), ("b/001.png", 1), ("b/more/000.JPG", 1),
    )
    picked = scan_image_folder(tmp_path, classes=["b", "a"])
    assert picked.classes == ("b", "a")
    assert [label for _, label in picked.samples] == [0, 0, 0, 1, 1, 1]
    assert picked.samples[0][0].startswith("b/")


def test_scan_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        scan_image_folder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        scan_image_folder(tmp_path / "file.png")
    with pytest.raises(DataError, match="no class folders") as info:
        scan_image_folder(tmp_path)
    assert "directly" in info.value.message and info.value.hint
    _make_folder(tmp_path, {"cat": 2})
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="'dog' holds no images"):
        scan_image_folder(tmp_path)
    with pytest.raises(DataError, match="'cow'") as info:
        scan_image_folder(tmp_path, classes=["cat", "cow"])
    assert "cat, dog" in info.value.hint
    with pytest.raises(DataError, match="more than once"):
        scan_image_folder(tmp_path, classes=["cat", "cat"])
    assert scan_image_folder(tmp_path, classes=["cat"]).classes == ("cat",)


@needs_cifar
def test_scan_real_cifar() -> None:
    index = scan_image_folder(CIFAR_200)
    assert len(index.classes) == 10 and len(index.samples) == 200
    for rel, label in index.samples:
        assert rel.split("/")[0] == index.classes[label]
        assert (CIFAR_200 / rel).is_file()
    assert [r for r, _ in index.samples] == sorted(r for r, _ in index.samples)


# --------------------------------------------------------------------------- selection


def test_select_deterministic_and_sharded(tmp_path: Path) -> None:
    index = scan_image_folder(_make_folder(tmp_path, {"a": 9, "b": 7, "c": 8}))
    first = select_samples(index, per_class=5, seed=3)
    assert first == select_samples(index, per_class=5, seed=3)
    assert first.samples != select_samples(index, per_class=5, seed=4).samples
    assert len(first.samples) == 15 and (first.seed, first.per_class, first.shard) == (3, 5, (0, 1))
    for label in range(3):
        paths = [p for p, lab in first.samples if lab == label]
        assert len(paths) == 5 and paths == sorted(paths)
    # a class's pick does not depend on which other classes are used
    only_b = scan_image_folder(tmp_path, classes=["b"])
    b_alone = [p for p, _ in select_samples(only_b, per_class=5, seed=3).samples]
    assert b_alone == [p for p, lab in first.samples if lab == 1]
    # shards partition the global selection
    shards = [select_samples(index, per_class=5, seed=3, shard=(r, 4)) for r in range(4)]
    for rank, shard in enumerate(shards):
        assert shard.samples == first.samples[rank::4] and shard.shard == (rank, 4)
    assert sorted(s for sh in shards for s in sh.samples) == sorted(first.samples)
    assert select_samples(index).samples == index.samples


def test_select_errors(tmp_path: Path) -> None:
    index = scan_image_folder(_make_folder(tmp_path, {"a": 4, "b": 2}))
    with pytest.raises(DataError, match="'b' has 2 images") as info:
        select_samples(index, per_class=3)
    assert info.value.remedy == Remedy("per_class", 2) and "per_class=2" in info.value.one_line()
    for shard in [(1, 1), (-1, 2), (0, 0)]:
        with pytest.raises(UsageError):
            select_samples(index, shard=shard)
    with pytest.raises(UsageError):
        select_samples(index, per_class=0)


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    per_class=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_select_property(counts: list[int], per_class: int, seed: int) -> None:
    from auditor.io.images import ImageFolderIndex

    classes = tuple(f"c{i}" for i in range(len(counts)))
    samples = tuple((f"c{i}/{j:03d}.png", i) for i, n in enumerate(counts) for j in range(n))
    index = ImageFolderIndex(Path("/nowhere"), classes, samples)
    if per_class > min(counts):
        with pytest.raises(DataError):
            select_samples(index, per_class=per_class, seed=seed)
        return
    chosen = select_samples(index, per_class=per_class, seed=seed).samples
    assert len(chosen) == per_class * len(counts)
    assert set(chosen) <= set(samples)
    assert list(chosen) == sorted(chosen, key=lambda s: (s[1], s[0]))


# --------------------------------------------------------------------------- dataset


def test_dataset_values_and_modes(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"a": 2}, size=32)
    folder = tmp_path / "a"
    rgb = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((32, 32, 1), 128, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=90)
    pre = PRESETS["cifar10"]
    dataset = ImageDataset(select_samples(scan_image_folder(tmp_path)), pre)
    assert dataset.input_shape == (3, 32, 32) and len(dataset) == 6
    for i, (rel, _) in enumerate(dataset.samples):
        tensor, index = dataset[i]
        assert index == i and tensor.dtype == torch.float32 and tensor.shape == (3, 32, 32)
        np.testing.assert_array_equal(tensor.numpy(), _expected(tmp_path / rel, pre.mean, pre.std))


def test_dataset_resize_crop_and_none(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"a": 1}, size=40)
    Image.new("RGB", (60, 30), (255, 0, 0)).save(tmp_path / "a" / "wide.png")
    selection = select_samples(scan_image_folder(tmp_path))
    crop = ImageDataset(selection, resolve_preprocessing("imagenet", size=24))
    assert crop.input_shape == (3, 24, 24)
    assert all(crop[i][0].shape == (3, 24, 24) for i in range(2))
    none = ImageDataset(selection, PRESETS["none"])
    assert none.input_shape == (3, 40, 40)
    tensor, _ = none[0]
    assert float(tensor.min()) >= 0 and float(tensor.max()) <= 1
    failure, _ = none[1]  # 60x30 among 40x40 images
    assert isinstance(failure, ImageFailure) and failure.fatal and "one size" in failure.reason
    small, _ = ImageDataset(selection, resolve_preprocessing("cifar10", size=48))[0]
    assert isinstance(small, ImageFailure) and small.fatal and "smaller" in small.reason


@pytest.mark.parametrize("shape", [(50, 37), (37, 50), (40, 40), (64, 30)])
def test_resize_crop_matches_torchvision(tmp_path: Path, shape: tuple[int, int]) -> None:
    from torchvision import transforms

    pixels = np.random.default_rng(5).integers(0, 256, (*shape, 3), dtype=np.uint8)
    (tmp_path / "a").mkdir()
    Image.fromarray(pixels).save(tmp_path / "a" / "img.png")
    pre = Preprocessing(24, 30, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25))
    ours, _ = ImageDataset(select_samples(scan_image_folder(tmp_path)), pre)[0]
    reference = transforms.Compose([
        transforms.Resize(30), transforms.CenterCrop(24), transforms.ToTensor(),
        transforms.Normalize(pre.mean, pre.std),
    ])(Image.fromarray(pixels))
    assert ours.shape == reference.shape == (3, 24, 24)
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), rtol=0, atol=1e-5)


def test_corrupt_image_never_crashes_the_loader(tmp_path: Path) -> None:
    _make_folder(tmp_path, {"a": 3, "b": 2})
    (tmp_path / "a" / "001.png").write_bytes(b"this is not a png at all")
    good = (tmp_path / "b" / "000.png").read_bytes()
    (tmp_path / "b" / "000.png").write_bytes(good[: len(good) // 2])  # truncated
    dataset = ImageDataset(select_samples(scan_image_folder(tmp_path)), PRESETS["none"])
    for workers in (0, 2):
        batches = list(make_loader(dataset, batch_size=2, workers=workers))
        failures = [f for b in batches for f in b.failures]
        assert [(i, f.path) for i, f in failures] == [(1, "a/001.png"), (3, "b/000.png")]
        assert all(not f.fatal and f.reason for _, f in failures)
        ok = torch.cat([b.indices for b in batches]).tolist()
        assert ok == [0, 2, 4]
        assert sum(len(b.images) for b in batches if b.images is not None) == 3
    lone = collate_images([(ImageFailure("x.png", "broken"), 7)])
    assert lone.images is None and lone.indices.tolist() == [] and lone.failures[0][0] == 7


def test_loader_start_and_order(tmp_path: Path) -> None:
    dataset = ImageDataset(
        select_samples(scan_image_folder(_make_folder(tmp_path, {"a": 3, "b": 4}))), PRESETS["none"]
    )
    full = torch.cat([b.images for b in make_loader(dataset, batch_size=3)])
    tail = list(make_loader(dataset, batch_size=3, start=3))
    assert [b.indices.tolist() for b in tail] == [[3, 4, 5], [6]]
    assert torch.equal(torch.cat([b.images for b in tail]), full[3:])


# --------------------------------------------------------------------------- #26: walks, special files, real ranges


def test_links_are_followed_but_no_folder_or_image_is_listed_twice(tmp_path) -> None:
    root = _make_folder(tmp_path / "data", {"class0": 2, "class1": 3})
    (root / "class0" / "loop").symlink_to("..")  # back to the root: class1 again, as class 0
    (root / "class0" / "again").symlink_to(root / "class1")
    (root / "class1" / "self").symlink_to(".")
    (root / "class0" / "same.png").symlink_to(root / "class1" / "000.png")  # one image under two names
    extra = _make_folder(tmp_path / "elsewhere", {"more": 2})
    (root / "class1" / "linked").symlink_to(extra / "more")  # a linked dataset folder: followed
    index = scan_image_folder(root)
    assert index.samples == (("class0/000.png", 0), ("class0/001.png", 0),
                             ("class1/000.png", 1), ("class1/001.png", 1), ("class1/002.png", 1),
                             ("class1/linked/000.png", 1), ("class1/linked/001.png", 1))


def test_special_files_named_as_images_are_skipped_with_a_warning(tmp_path) -> None:
    import os

    root = _make_folder(tmp_path, {"a": 2, "b": 2})
    os.mkfifo(root / "a" / "x.png")  # opening it would wait forever
    with pytest.warns(UserWarning, match=r"1 image name\(s\) that are not regular files skipped .*: a/x.png"):
        index = scan_image_folder(root)
    assert [rel for rel, _ in index.samples] == ["a/000.png", "a/001.png", "b/000.png", "b/001.png"]


def test_float_and_wide_integer_images_are_mapped_by_their_real_range(tmp_path) -> None:
    from auditor.io.images import ImageFailure, Preprocessing

    ramp = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    images = {
        "unit.tiff": Image.fromarray(ramp, "F"),  # floats in [0, 1]: was read as black
        "byte.tiff": Image.fromarray(ramp * 255, "F"),
        "wide.tiff": Image.fromarray((ramp * 65535).astype(np.int32), "I"),
        "negative.tiff": Image.fromarray(ramp - 0.5, "F"),  # no 8-bit range holds it: refused
    }
    folder = tmp_path / "c"
    folder.mkdir()
    for name, image in images.items():
        image.save(folder / name)
    index = scan_image_folder(tmp_path)
    dataset = ImageDataset(select_samples(index), Preprocessing(size=None, preset="none"))
    loaded = {rel.split("/")[1]: dataset[i][0] for i, (rel, _) in enumerate(index.samples)}
    expected = np.clip(ramp * 255.0, 0, 255).astype(np.uint8) / np.float32(255)  # PIL's L -> RGB, independently
    for name in ("unit.tiff", "byte.tiff", "wide.tiff"):
        assert torch.equal(loaded[name][0], torch.from_numpy(expected.astype(np.float32))), name
    failure = loaded["negative.tiff"]
    assert isinstance(failure, ImageFailure) and "no 8-bit range holds them" in failure.reason
