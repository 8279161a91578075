"""--data labels.csv: a flat image folder with path,label rows, same order and numbers as the class folders."""

from __future__ import annotations

import shutil

import pytest
import torch

from auditor.errors import DataError
from auditor.io.images import scan_image_folder

from conftest import FIXTURES, run_cli

DIGITS = FIXTURES / "digits"
CHECKPOINT = FIXTURES / "resnet8-digits.safetensors"


def _flatten(tmp_path):
    """The digits as one flat folder (class_file names) and a shuffled labels file."""
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = []
    for image in sorted(DIGITS.glob("*/*.png"), reverse=True):
        name = f"{image.parent.name}_{image.name}"
        shutil.copy(image, flat / name)
        rows.append(f"{name},{image.parent.name}")
    (flat / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return flat / "labels.csv"


def test_labels_csv_gives_the_class_folders_images(tmp_path) -> None:
    from auditor.tasks.images import open_images
    from auditor.subject import open_subject

    labels = _flatten(tmp_path)
    index, folder = scan_image_folder(labels), scan_image_folder(DIGITS)
    assert index.classes == folder.classes
    assert [(rel.replace("_", "/", 1), label) for rel, label in index.samples] == list(folder.samples)
    subject = open_subject(CHECKPOINT)
    a = open_images(labels, subject, per_class=3, seed=1)
    b = open_images(DIGITS, subject, per_class=3, seed=1)
    assert [(r.replace("_", "/", 1), l) for r, l in a.dataset.samples] == list(b.dataset.samples)
    for position in range(len(a.dataset)):
        assert torch.equal(a.dataset.load(position), b.dataset.load(position))


@pytest.mark.parametrize("row,needle", [
    ("missing.png,3", "no image 'missing.png'"),
    ("0_0048.png,", "empty label"),
    (",3", "empty path"),
    ("0_0048.png", "1 fields"),
    ("../x.png,3", "is not inside"),
])
def test_bad_rows_are_refused_in_one_line(tmp_path, capsys, row, needle) -> None:
    labels = _flatten(tmp_path)
    labels.write_text(labels.read_text() + row + "\n")
    with pytest.raises(DataError, match="line"):
        scan_image_folder(labels)
    target = tmp_path / "out.h5"
    code, out, err = run_cli(["extract", CHECKPOINT, "--data", labels, "-o", target], capsys)
    assert code == 2 and out == "" and not list(tmp_path.glob("out.h5*"))
    assert len(err.strip().splitlines()) == 1 and needle in err, err
