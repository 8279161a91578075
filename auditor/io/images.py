"""Labeled image folders: scanning, deterministic sample selection, preprocessing.

Layout: one sub-folder per class (the torchvision ``ImageFolder`` layout)::

    root/
        cat/  001.png  002.png ...
        dog/  001.png ...

Everything here is deterministic: class names and file names are sorted,
per-class sampling is seeded (and independent of the other classes), and the
transforms have no randomness. Unreadable images never crash a loader: the
dataset returns an :class:`ImageFailure` in place of the tensor and
:func:`collate_images` moves it aside, so the caller can list (or, in strict
mode, refuse) them.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import DataError, Remedy, UsageError
from .archive import is_archive, scan_archive
from .class_choice import choose_classes
from .image_kinds import IMAGE_EXTENSIONS, is_image
from .labels_csv import scan_labels_csv
from .walk import class_files

__all__ = [
    "IMAGE_EXTENSIONS",
    "PRESETS",
    "Preprocessing",
    "resolve_preprocessing",
    "ImageFolderIndex",
    "images_per_class",
    "scan_image_folder",
    "ImageSelection",
    "select_samples",
    "ImageFailure",
    "ImageBatch",
    "ImageDataset",
    "collate_images",
    "make_loader",
]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2471, 0.2435, 0.2616)


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a network input.

    Steps: convert to RGB; resize the shorter side to ``resize`` (bilinear,
    antialiased; skipped when ``resize`` is None); center-crop to
    ``size`` x ``size``; scale pixels to [0, 1]; normalize with ``mean`` and
    ``std`` (skipped when both are None).

    Attributes
    ----------
    size : int or None
        Side of the final square crop. None keeps every image's own size
        (the ``none`` preset); the images must then all have the same size.
    resize : int or None
        Shorter side before the center crop.
    mean, std : tuple of 3 floats, or None
        Per-channel normalization.
    preset : str
        The preset this started from (``imagenet``, ``cifar10``, ``none``),
        ``checkpoint`` when it came from checkpoint metadata. Not part of
        :meth:`to_dict`.
    """

    size: int | None
    resize: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    preset: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        """``{"size", "resize", "mean", "std"}`` with lists for tuples (JSON-ready)."""
        return {
            "size": self.size,
            "resize": self.resize,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as canonical JSON (sorted keys), as stored in HDF5."""
        return json.dumps(self.to_dict(), sort_keys=True)


PRESETS: dict[str, Preprocessing] = {
    "imagenet": Preprocessing(224, 256, _IMAGENET_MEAN, _IMAGENET_STD, "imagenet"),
    "cifar10": Preprocessing(32, None, _CIFAR10_MEAN, _CIFAR10_STD, "cifar10"),
    "none": Preprocessing(None, None, None, None, "none"),
}


def _triple(value: Any, what: str, positive: bool) -> tuple[float, float, float]:
    """Three floats from a sequence or a comma-separated string ("0.5,0.5,0.5")."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    try:
        items = [float(v) for v in value]
    except (TypeError, ValueError):
        raise UsageError(
            f"{what} must be 3 numbers (R, G, B), got {value!r}",
            hint=f"for example --{what} 0.485,0.456,0.406",
        ) from None
    if len(items) != 3:
        raise UsageError(f"{what} must have 3 values (R, G, B), got {len(items)}: {value!r}")
    if not all(math.isfinite(v) for v in items):
        raise UsageError(f"{what} must be finite, got {items}")
    if positive and not all(v > 0 for v in items):
        raise UsageError(f"{what} must be positive, got {items}", hint="std divides the pixels")
    return (items[0], items[1], items[2])


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _from_metadata(raw: str, base: Preprocessing) -> Preprocessing:
    """``base`` with the fields the metadata JSON names replaced."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise UsageError("checkpoint metadata 'preprocessing' is nested too deeply to be read") from None
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"checkpoint metadata 'preprocessing' is not JSON ({exc.msg})",
            hint="give the preprocessing explicitly: a preset, or size, mean and std",
        ) from None
    if not isinstance(data, dict):
        raise UsageError("checkpoint metadata 'preprocessing' must be a JSON object")
    unknown = sorted(set(data) - {"size", "resize", "mean", "std"})
    if unknown:
        raise UsageError(
            f"checkpoint metadata 'preprocessing' has unknown keys: {', '.join(unknown)}",
            hint="known keys: size, resize, mean, std",
        )
    return replace(base, **data, preset="checkpoint")


def _validated(pre: Preprocessing) -> Preprocessing:
    size = None if pre.size is None else _positive_int(pre.size, "size")
    resize = None if pre.resize is None else _positive_int(pre.resize, "resize")
    if resize is not None and size is not None and resize < size:
        raise UsageError(f"resize ({resize}) must not be smaller than the crop size ({size})")
    if resize is not None and size is None:
        raise UsageError("resize needs a crop size", hint="pass {remedy}", remedy=Remedy("size", None))
    if (pre.mean is None) != (pre.std is None):
        raise UsageError("mean and std go together: give both or neither", hint="pass both")
    mean = None if pre.mean is None else _triple(pre.mean, "mean", positive=False)
    std = None if pre.std is None else _triple(pre.std, "std", positive=True)
    return Preprocessing(size, resize, mean, std, pre.preset)


def resolve_preprocessing(
    preset: str | None = None,
    size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    checkpoint_metadata: Mapping[str, str] | None = None,
    *,
    default_preset: str = "imagenet",
) -> Preprocessing:
    """Decide the preprocessing from flags, checkpoint metadata and presets.

    Precedence, per field: explicit ``size`` / ``mean`` / ``std`` win; then
    an explicitly named ``preset``; then the checkpoint metadata
    (``preprocessing``, a JSON object with any of ``size``, ``resize``,
    ``mean``, ``std``, the others taken from ``default_preset``; else
    ``preset``, a preset name); then ``default_preset``.

    Parameters
    ----------
    preset : str, optional
        ``imagenet``, ``cifar10`` or ``none``.
    size : int, optional
        Final crop size. With a preset that resizes, the resize side is
        scaled in proportion (imagenet: 256/224).
    mean, std : sequence of 3 floats, or str, optional
        Normalization (a string is comma-separated: ``"0.5,0.5,0.5"``);
        ``std`` must be positive.
    checkpoint_metadata : mapping of str to str, optional
        :attr:`Checkpoint.metadata`.
    default_preset : str
        Used when nothing else decides (``cifar10`` for 32-pixel CIFAR
        models, ``imagenet`` otherwise: the caller knows the architecture).

    Returns
    -------
    Preprocessing

    Raises
    ------
    UsageError
        Unknown preset, malformed metadata, invalid size, mean or std.
    """
    metadata = checkpoint_metadata or {}
    for name in (preset, default_preset):
        if name is not None and name not in PRESETS:
            raise UsageError(
                f"unknown preset {name!r}", hint=f"known presets: {', '.join(PRESETS)}"
            )
    if preset is not None:
        base = PRESETS[preset]
    elif metadata.get("preprocessing"):
        base = _validated(_from_metadata(metadata["preprocessing"], PRESETS[default_preset]))
    elif metadata.get("preset") in PRESETS:
        base = PRESETS[metadata["preset"]]
    else:
        base = PRESETS[default_preset]
    if size is not None:
        size = _positive_int(size, "size")
        resize = base.resize
        if resize is not None and base.size:
            resize = max(size, int(round(size * resize / base.size)))
        base = replace(base, size=size, resize=resize)
    if mean is not None:
        base = replace(base, mean=_triple(mean, "mean", positive=False))
    if std is not None:
        base = replace(base, std=_triple(std, "std", positive=True))
    return _validated(base)


# --------------------------------------------------------------------------- folders


@dataclass(frozen=True)
class ImageFolderIndex:
    """Every image of a class-per-folder tree.

    Attributes
    ----------
    root : Path
        The folder, resolved to an absolute path.
    classes : tuple of str
        Class names; a sample's label is its class's position here.
    samples : tuple of (str, int)
        POSIX paths relative to ``root`` and labels, grouped by class in
        ``classes`` order, sorted by path within a class.
    reader : callable or None
        ``reader(rel) -> bytes`` for a tree inside an archive (``root`` is then
        the archive); None for a folder.
    """

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]
    reader: Any = None


def images_per_class(classes: Sequence[str], samples: Sequence[tuple[str, int]]) -> dict[str, int]:
    """How many of ``samples`` (``(path, label)`` pairs) each class holds, in ``classes`` order."""
    counts = {name: 0 for name in classes}
    for _, label in samples:
        counts[classes[label]] += 1
    return counts


def scan_image_folder(root: str | Path, classes: Sequence[str] | None = None) -> ImageFolderIndex:
    """Index a class-per-folder image tree.

    Parameters
    ----------
    root : str or Path
        Folder holding one sub-folder per class; or an archive of one
        (``.tar``, ``.tar.gz``, ``.zip``, :mod:`auditor.io.archive`); or a
        ``path,label`` CSV beside flat images (:mod:`auditor.io.labels_csv`).
    classes : sequence of str, optional
        Use only these classes, in this order (labels follow it). Default:
        every sub-folder, sorted by name.

    Returns
    -------
    ImageFolderIndex

    Raises
    ------
    DataError
        Missing root, no class folders, an empty class folder, a requested
        class that does not exist, or a class listed twice.
    """
    given = Path(root)
    if is_archive(given):  # .tar / .tar.gz / .zip, read in place
        return ImageFolderIndex(*scan_archive(given, classes))
    if given.is_file() and given.suffix.lower() == ".csv":  # flat folder + path,label file
        return ImageFolderIndex(*scan_labels_csv(given, classes))
    if not given.exists():
        raise DataError(f"{given}: no such folder", hint="the images are a folder with one sub-folder per class")
    if not given.is_dir():
        raise DataError(f"{given}: not a folder", hint="the images are a folder with one sub-folder per class")
    path = given.resolve()
    known = sorted(
        entry.name for entry in os.scandir(path)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not known:
        loose = any(is_image(e.name) for e in os.scandir(path) if e.is_file())
        raise DataError(
            f"{given}: no class folders" + (" (the images lie directly in it)" if loose else ""),
            hint="put the images of each class in a sub-folder named after the class",
        )
    chosen = choose_classes(known, classes, str(given), "no class folder")
    samples: list[tuple[str, int]] = []
    listed = class_files(path, chosen, is_image)  # links followed, no folder twice, no FIFO
    for label, name in enumerate(chosen):
        files = listed[name]
        if not files:
            raise DataError(
                f"{given}: class folder {name!r} holds no images",
                hint=f"image extensions: {', '.join(IMAGE_EXTENSIONS)}; remove the folder or "
                "leave the class out",
            )
        samples.extend((f, label) for f in files)
    return ImageFolderIndex(path, tuple(chosen), tuple(samples))


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class ImageSelection:
    """The samples one process works on.

    Attributes
    ----------
    root : Path
    classes : tuple of str
    samples : tuple of (str, int)
        Relative paths and labels, in processing order.
    seed : int
    per_class : int or None
        None: every image.
    shard : (int, int)
        ``(rank, world)``; this process holds ``selection[rank::world]``.
    reader : callable or None
        As in :class:`ImageFolderIndex`.
    """

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]
    seed: int = 0
    per_class: int | None = None
    shard: tuple[int, int] = (0, 1)
    reader: Any = None

# Seeds go to numpy (any integer >= 0) and, plus a block's index, to torch.Generator (below 2**64); the
# stability options take them below 2**62 (analysis/stability/checks.py): one range everywhere.
MAX_SEED = 2**62 - 1


def _class_seed(seed: int, name: str) -> list[int]:
    return [int(seed), zlib.crc32(name.encode())]


def select_samples(
    index: ImageFolderIndex,
    per_class: int | None = None,
    seed: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> ImageSelection:
    """Pick ``per_class`` images of each class, deterministically, then shard.

    Each class is sampled by its own ``numpy.random.Generator`` seeded from
    ``seed`` and the class name, so a class's selection does not depend on
    the other classes or their order. The chosen images are sorted by path
    within their class. The full selection is computed first; rank ``r`` of
    ``world`` then takes ``selection[r::world]``.

    Parameters
    ----------
    index : ImageFolderIndex
    per_class : int, optional
        Images per class; None takes every image.
    seed : int
    shard : (int, int)
        ``(rank, world)``.

    Raises
    ------
    DataError
        A class with fewer than ``per_class`` images.
    UsageError
        ``per_class`` < 1 or an invalid shard.
    """
    rank, world = (int(shard[0]), int(shard[1]))
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"invalid shard {rank}/{world}: need 0 <= rank < world")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"seed must be a non-negative integer below 2**62, got {seed!r}",
                         hint="any seed in that range; 0 is the default")
    if per_class is not None:
        per_class = _positive_int(per_class, "samples per class")
    by_class: list[list[tuple[str, int]]] = [[] for _ in index.classes]
    for rel, label in index.samples:
        by_class[label].append((rel, label))
    chosen: list[tuple[str, int]] = []
    for label, members in enumerate(by_class):
        if per_class is None:
            chosen.extend(members)
            continue
        if len(members) < per_class:
            raise DataError(
                f"class {index.classes[label]!r} has {len(members)} images, fewer than the "
                f"{per_class} per class requested",
                hint="lower {remedy} or add images", remedy=Remedy("per_class", len(members)),
            )
        rng = np.random.default_rng(_class_seed(seed, index.classes[label]))
        picked = np.sort(rng.choice(len(members), size=per_class, replace=False))
        chosen.extend(members[i] for i in picked)
    return ImageSelection(
        index.root, index.classes, tuple(chosen[rank::world]), int(seed), per_class, (rank, world), index.reader
    )


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class ImageFailure:
    """An image that could not be used.

    Attributes
    ----------
    path : str
        Relative to the data root.
    reason : str
        One line.
    fatal : bool
        True when the problem is the configuration, not the file (an image
        smaller than the crop, sizes that differ under the ``none`` preset):
        it is raised even when unreadable files are only skipped.
    """

    path: str
    reason: str
    fatal: bool = False


class ImageBatch(NamedTuple):
    """What the loader yields.

    Attributes
    ----------
    images : Tensor of shape (n_ok, 3, H, W), or None when every image failed
    indices : Tensor of shape (n_ok,)
        Positions of the images in the dataset.
    failures : list of (int, ImageFailure)
    """

    images: torch.Tensor | None
    indices: torch.Tensor
    failures: list[tuple[int, ImageFailure]]


def _value_scale(mode: str, array: np.ndarray) -> float:
    """The white level of a 16-bit, 32-bit integer or float image, from its mode and its real range.

    16-bit: 65535. 32-bit integers: 255 or 65535, whichever holds the values.
    Floats: 1 for values in [0, 1], 255 for values in [0, 255].

    Raises
    ------
    ValueError
        Values outside every such range (negative, NaN, above 65535): no
        faithful 8-bit image exists; the image is reported unreadable.
    """
    if mode.startswith("I;16"):
        return 65535.0
    low, high = float(array.min(initial=0)), float(array.max(initial=0))
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0:
        raise ValueError(f"{mode} image with values in [{low:g}, {high:g}]: no 8-bit range holds them")
    if mode == "F" and high <= 1.0:
        return 1.0
    if high <= 255.0:
        return 255.0
    if mode == "I" and high <= 65535.0:
        return 65535.0
    raise ValueError(f"{mode} image with values up to {high:g}: no 8-bit range holds them")


def _open_rgb(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        limit = Image.MAX_IMAGE_PIXELS  # PIL's own decompression-bomb limit, an error here rather than a warning
        if limit and image.width * image.height > limit:
            raise ValueError(f"{image.width}x{image.height} pixels, more than the decoder's limit of {limit}")
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            array = np.asarray(image, dtype=np.float64)
            scale = _value_scale(image.mode, array)
            image = Image.fromarray(np.clip(array / scale * 255.0, 0, 255).astype(np.uint8), "L")
        return image.convert("RGB")


def _resize_shorter(image: Any, side: int) -> Any:
    """Bilinear (antialiased) resize of the shorter side to ``side``.

    The same sizes and pixels as torchvision's ``Resize(side)`` on a PIL image.
    """
    from PIL import Image

    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == side:
        return image
    new_long = int(side * long / short)
    size = (side, new_long) if width <= height else (new_long, side)
    return image.resize(size, Image.BILINEAR)


def _center_crop(image: Any, height: int, width: int) -> Any:
    """The central ``height`` x ``width`` window (torchvision's rounding)."""
    top = int(round((image.height - height) / 2.0))
    left = int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def _first_line(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [""])[0].strip()
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


class ImageDataset(Dataset):
    """Preprocessed images of an :class:`ImageSelection`.

    ``dataset[i]`` is ``(tensor of shape (3, H, W), i)``, or
    ``(ImageFailure, i)`` when the file cannot be decoded (it never raises
    for a bad file). Use :func:`make_loader`, whose collate function sets
    failures aside.

    Parameters
    ----------
    selection : ImageSelection
    preprocessing : Preprocessing
        With ``size=None`` (the ``none`` preset) the first readable image
        fixes the input size, read when the dataset is created.

    Raises
    ------
    DataError
        ``size=None`` and no image is readable.
    """

    def __init__(self, selection: ImageSelection, preprocessing: Preprocessing) -> None:
        self.selection = selection
        self.preprocessing = preprocessing
        self._mean: np.ndarray | None = None
        self._std: np.ndarray | None = None
        if preprocessing.mean is not None and preprocessing.std is not None:
            self._mean = np.asarray(preprocessing.mean, dtype=np.float32)
            self._std = np.asarray(preprocessing.std, dtype=np.float32)
        if preprocessing.size is not None:
            self._hw = (preprocessing.size, preprocessing.size)
        else:
            self._hw = self._probe_size()

    @property
    def root(self) -> Path:
        """The data root."""
        return self.selection.root

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, by label."""
        return self.selection.classes

    @property
    def samples(self) -> tuple[tuple[str, int], ...]:
        """(relative path, label) of every item."""
        return self.selection.samples

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(3, H, W)`` of every tensor this dataset yields."""
        return (3, self._hw[0], self._hw[1])

    def _probe_size(self) -> tuple[int, int]:
        for rel, _ in self.selection.samples:
            try:
                image = self._open(rel)
            except Exception:
                continue
            return (image.height, image.width)
        raise DataError(
            f"{self.selection.root}: none of the {len(self.selection.samples)} selected images "
            "can be read",
        )

    def __len__(self) -> int:
        return len(self.selection.samples)

    def _open(self, rel: str) -> Any:
        """The image ``rel`` as RGB, from the folder or from the archive's member."""
        if self.selection.reader is None:
            return _open_rgb(self.selection.root / rel)
        import io

        return _open_rgb(io.BytesIO(self.selection.reader(rel)))

    def load(self, index: int) -> torch.Tensor:
        """The preprocessed image ``index``; raises on an unreadable file."""
        rel = self.selection.samples[index][0]
        image = self._open(rel)
        pre = self.preprocessing
        if pre.resize is not None:
            image = _resize_shorter(image, pre.resize)
        height, width = self._hw
        if (image.height, image.width) != (height, width):
            if pre.size is None:
                raise _ConfigError(
                    f"image is {image.width}x{image.height}, the others {width}x{height} "
                    "(the 'none' preset needs one size)"
                )
            if image.height < height or image.width < width:
                raise _ConfigError(
                    f"image is {image.width}x{image.height}, smaller than the {width}x{height} crop "
                    "(use a preset that resizes, or a smaller crop size)"
                )
            image = _center_crop(image, height, width)
        # True IEEE division (torch turns division by a scalar into a multiplication
        # by its reciprocal, which rounds differently): x / 255, then (x - mean) / std.
        array = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        if self._mean is not None:
            array = (array - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def __getitem__(self, index: int) -> tuple[torch.Tensor | ImageFailure, int]:
        try:
            return self.load(index), index
        except _ConfigError as exc:
            return ImageFailure(self.selection.samples[index][0], str(exc), True), index
        except Exception as exc:  # any decoder error: set the file aside, never crash
            return ImageFailure(self.selection.samples[index][0], _first_line(exc)), index


class _ConfigError(Exception):
    """An image that does not fit the preprocessing (reported as a fatal failure)."""


def collate_images(batch: list[tuple[torch.Tensor | ImageFailure, int]]) -> ImageBatch:
    """Stack the good images of a batch; list the failures beside them."""
    good = [(t, i) for t, i in batch if isinstance(t, torch.Tensor)]
    failures = [(i, t) for t, i in batch if isinstance(t, ImageFailure)]
    images = torch.stack([t for t, _ in good]) if good else None
    indices = torch.tensor([i for _, i in good], dtype=torch.int64)
    return ImageBatch(images, indices, failures)


def make_loader(
    dataset: ImageDataset,
    *,
    batch_size: int = 32,
    workers: int = 0,
    pin_memory: bool = False,
    start: int = 0,
) -> DataLoader:
    """A deterministic, in-order loader of ``dataset[start:]`` yielding :class:`ImageBatch`.

    Parameters
    ----------
    dataset : ImageDataset
    batch_size : int
    workers : int
        Worker processes (0: load in the calling process).
    pin_memory : bool
        Pin batches (for a CUDA device).
    start : int
        First item (resuming); batches are ``[start, start + batch_size)``, ...
    """
    subset = dataset if start == 0 else Subset(dataset, range(start, len(dataset)))
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None,
    )
