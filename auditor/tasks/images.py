"""Open a labeled image folder for a subject: preprocessing, selection, dataset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..io.images import (
    ImageDataset,
    ImageFailure,
    Preprocessing,
    images_per_class,
    resolve_preprocessing,
    scan_image_folder,
    select_samples,
)
from ..subject import Subject, open_subject
from .data_request import DataRequest

__all__ = ["PreparedImages", "ImageSample", "open_data", "open_images", "sample_images", "skipped_message"]


@dataclass(frozen=True)
class PreparedImages:
    """A dataset ready for the subject, and how it was prepared."""

    dataset: ImageDataset
    preprocessing: Preprocessing
    preset: str | None
    source: Mapping[str, str] | None = None
    origin: Mapping[str, str] | None = None

    def section(self, skipped: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
        """The ``data`` object of the JSON report.

        ``samples_per_class`` counts the images used: ``skipped`` ones (unreadable,
        ``{path, reason}`` as the activation store lists them) are listed, not counted.
        """
        label_of = {path: label for path, label in self.dataset.samples}
        counts = images_per_class(self.dataset.classes, self.dataset.samples)
        for entry in skipped:
            label = label_of.get(entry["path"])
            if label is not None:
                counts[self.dataset.classes[label]] -= 1
        section: dict[str, Any] = {
            "root": str(self.dataset.root),
            "classes": list(self.dataset.classes),
            "samples_per_class": counts,
            "preset": self.preset,
            "preprocessing": self.preprocessing.to_dict(),
            "input_shape": list(self.dataset.input_shape),
        }
        if skipped:
            section["skipped"] = [dict(entry) for entry in skipped]
        if self.source:
            section["source"] = dict(self.source)
        if self.origin:
            section["preprocessing_source"] = dict(self.origin)
        return section


def skipped_message(root: str | Path, skipped: Sequence[Mapping[str, str]]) -> str:
    """One line naming the unreadable images that were left out (the first few, with the first reason)."""
    names = ", ".join(entry["path"] for entry in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
    return (f"{len(skipped)} unreadable image(s) in {root} skipped and not counted: {names} "
            f"({skipped[0].get('reason', 'unreadable')})")


def _default_preset(subject: Subject) -> str:
    return "cifar10" if subject.anatomy.input_shape[1] <= 64 else "imagenet"


def open_images(
    root: str | Path,
    subject: Subject,
    *,
    preset: str | None = None,
    size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    classes: Sequence[str] | None = None,
    per_class: int | None = None,
    seed: int | None = None,
) -> PreparedImages:
    """Scan ``root``, pick samples, and build the dataset with the right preprocessing.

    ``root`` that is not an existing path names a data source
    (:mod:`auditor.io.data_sources`); the arguments given override its keys
    (``seed`` overrides it when given; None: the source's seed, else 0).

    Preprocessing: explicit flags win, then the checkpoint's ``preprocessing``
    metadata, then ``preset`` (default ``cifar10`` for inputs up to 64 px, else
    ``imagenet``).

    Raises
    ------
    DataError
        A folder without classes, an empty class, an unknown class, too few images,
        or images whose size does not match the network's input.
    """
    from ..io.data_sources import resolve_data_source

    source = resolve_data_source(root)
    caller = {k for k, v in dict(preset=preset, size=size, mean=mean, std=std).items() if v is not None}
    if source is not None:  # --data NAME: the source's keys, overridden by what the caller gave
        given = dict(preset=preset, size=size, mean=mean, std=std, classes=classes, per_class=per_class)
        chosen = {**source.options, **{k: v for k, v in given.items() if v is not None}}
        preset, size, mean, std = chosen.get("preset"), chosen.get("size"), chosen.get("mean"), chosen.get("std")
        classes, per_class = chosen.get("classes"), chosen.get("per_class")
        root = source.path
    if seed is None:  # the source's seed, else 0; a seed the caller gives wins, 0 included
        seed = source.options.get("seed", 0) if source is not None else 0
    has_meta = bool(subject.checkpoint.metadata.get("preprocessing"))
    preprocessing = resolve_preprocessing(
        preset, size, mean, std, subject.checkpoint.metadata, default_preset=_default_preset(subject)
    )
    index = scan_image_folder(root, classes)
    selection = select_samples(index, per_class, seed)
    dataset = ImageDataset(selection, preprocessing)
    if tuple(dataset.input_shape) != tuple(subject.anatomy.input_shape):
        raise DataError(
            f"images become {'x'.join(map(str, dataset.input_shape))} after preprocessing but the network "
            f"was set up for {'x'.join(map(str, subject.anatomy.input_shape))}",
            hint="make the preprocessing size and the network's input size agree",
        )
    used = preset or ("checkpoint metadata" if has_meta and size is None and mean is None else _default_preset(subject))
    origin = _preprocessing_origin(subject, preset, size, mean, std, caller, source.name if source else None)
    return PreparedImages(dataset, preprocessing, used, source.section() if source is not None else None, origin)


def open_data(checkpoint: str | Path, request: DataRequest) -> tuple[Subject, PreparedImages]:
    """Open a checkpoint and the images it is measured on: the one opening step of every command that reads images.

    Parameters
    ----------
    checkpoint : str or Path
        Checkpoint file (or folder), as in :func:`auditor.subject.open_subject`.
    request : DataRequest
        The images (``request.data``, required here), the architecture and input size, and the
        preprocessing and selection options.

    Returns
    -------
    (Subject, PreparedImages)

    Raises
    ------
    AuditorError
        What :func:`auditor.subject.open_subject` and :func:`open_images` raise.
    """
    if request.data is None:
        raise ValueError("open_data needs request.data (a folder or a data source's name)")
    subject = open_subject(checkpoint, arch=request.arch, input_size=request.input_size)
    return subject, open_images(request.data, subject, **request.image_options())


def _preprocessing_origin(
    subject: Subject, preset: str | None, size: int | None, mean: Any, std: Any, caller: set[str], source: str | None
) -> dict[str, str]:
    """Where each of size, resize, mean, std came from (the precedence of :func:`resolve_preprocessing`)."""
    def given(key: str) -> str:
        return "option" if key in caller or source is None else f"data source {source!r}"

    metadata = subject.checkpoint.metadata
    files = metadata.get("layout_files") or "checkpoint metadata"
    from_meta = subject.checkpoint.meta_json("preprocessing")
    default = f"{_default_preset(subject)} default for a {subject.anatomy.input_shape[1]} px input"
    origin: dict[str, str] = {}
    for key in ("size", "resize", "mean", "std"):
        if preset is not None:
            origin[key] = f"preset {preset} ({given('preset')})"
        elif isinstance(from_meta, dict) and key in from_meta:
            origin[key] = files
        elif metadata.get("preset") in ("imagenet", "cifar10", "none"):
            origin[key] = f"checkpoint metadata preset {metadata['preset']}"
        else:
            origin[key] = default
    for key, value in (("size", size), ("mean", mean), ("std", std)):
        if value is not None:
            origin[key] = given(key)
    if size is not None:
        origin["resize"] = f"scaled with size ({origin['resize']})"
    return origin


@dataclass(frozen=True)
class ImageSample:
    """Images drawn by :func:`sample_images`.

    Attributes
    ----------
    images : Tensor of shape (n, 3, H, W)
    labels : ndarray of shape (n,)
    skipped : tuple of dict
        ``{path, reason}`` of every unreadable image passed over on the way.
    """

    images: torch.Tensor
    labels: np.ndarray
    skipped: tuple[dict[str, str], ...] = ()


def sample_images(data: PreparedImages, count: int, seed: int = 0) -> ImageSample:
    """Up to ``count`` preprocessed images spread over the classes (seeded), and their labels.

    Unreadable images are skipped and listed (``skipped``); the result is
    deterministic for a seed.
    """
    samples = data.dataset.samples
    by_class: dict[int, list[int]] = {}
    for position, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(position)
    rng = np.random.default_rng(seed)
    queues = {label: list(rng.permutation(positions)) for label, positions in sorted(by_class.items())}
    order: list[int] = []
    while len(order) < len(samples) and any(queues.values()):
        for label in sorted(queues):
            if queues[label]:
                order.append(int(queues[label].pop(0)))
    tensors, labels, skipped = [], [], []
    for position in order:
        if len(tensors) == count:
            break
        item, _ = data.dataset[position]  # an unreadable file comes back as an ImageFailure, not an exception
        if isinstance(item, ImageFailure):
            skipped.append({"path": item.path, "reason": item.reason})
            continue
        tensors.append(item)
        labels.append(samples[position][1])
    if not tensors:
        raise DataError(f"{data.dataset.root}: no readable image to measure stability on")
    return ImageSample(torch.stack(tensors), np.asarray(labels), tuple(skipped))
