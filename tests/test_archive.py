"""--data x.tar / x.tar.gz / x.zip: read in place, same order and numbers as the unpacked folder; hostile archives refused."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from auditor.errors import DataError
from auditor.io.images import scan_image_folder

from conftest import FIXTURES, run_cli, run_json

DIGITS = FIXTURES / "digits"
CHECKPOINT = FIXTURES / "resnet8-digits.safetensors"


def _pack(folder: Path, target: Path, top: str | None = "digits") -> Path:
    """Pack ``folder`` (files in os order, not sorted: the reader must sort) under ``top``/."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    files.reverse()
    arc = (lambda p: f"{top}/{p.relative_to(folder).as_posix()}") if top else (lambda p: p.relative_to(folder).as_posix())
    if target.name.endswith(".zip"):
        with zipfile.ZipFile(target, "w") as archive:
            for path in files:
                archive.write(path, arc(path))
    else:
        with tarfile.open(target, "w:gz" if target.name.endswith(".gz") else "w") as archive:
            for path in files:
                archive.add(path, arc(path))
    return target


@pytest.mark.parametrize("suffix,top", [(".tar", "digits"), (".tar.gz", "digits"), (".zip", "digits"), (".zip", None)])
def test_archive_index_and_pixels_equal_the_folder(tmp_path, suffix, top) -> None:
    from auditor.tasks.images import open_images
    from auditor.subject import open_subject

    archive = _pack(DIGITS, tmp_path / f"digits{suffix}", top)
    folder_index = scan_image_folder(DIGITS)
    archive_index = scan_image_folder(archive)
    assert archive_index.classes == folder_index.classes
    assert archive_index.samples == folder_index.samples
    assert archive_index.root == archive.resolve()
    subject = open_subject(CHECKPOINT)
    from_folder = open_images(DIGITS, subject, per_class=5, seed=2)
    from_archive = open_images(archive, subject, per_class=5, seed=2)
    assert from_archive.dataset.samples == from_folder.dataset.samples
    for position in range(len(from_folder.dataset)):
        assert torch.equal(from_archive.dataset.load(position), from_folder.dataset.load(position))


def test_extract_from_a_tar_gz_equals_the_folder(tmp_path, capsys) -> None:
    import h5py
    import numpy as np

    archive = _pack(DIGITS, tmp_path / "digits.tar.gz")
    outputs = {}
    for name, data in (("folder", DIGITS), ("archive", archive)):
        target = tmp_path / f"{name}.h5"
        code, _, err = run_cli(["extract", CHECKPOINT, "--data", data, "--per-class", "4", "--workers", "1",
                                "-o", target, "--no-progress"], capsys)
        assert code == 0, err
        with h5py.File(target, "r") as handle:
            outputs[name] = {key: np.asarray(handle["stages"][key]) for key in handle["stages"]}
            outputs[name]["labels"] = np.asarray(handle["samples/label"])
    assert outputs["folder"].keys() == outputs["archive"].keys()
    for key, values in outputs["folder"].items():
        np.testing.assert_array_equal(outputs["archive"][key], values)


def _tar_with(tmp_path: Path, build) -> Path:
    target = tmp_path / "bad.tar"
    with tarfile.open(target, "w") as archive:
        build(archive)
    return target


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    info.linkname = link
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


PNG = (DIGITS / "0").iterdir().__next__().read_bytes()


@pytest.mark.parametrize("build,needle", [
    (lambda a: _add_bytes(a, "a/../../evil.png", PNG), "outside the archive"),
    (lambda a: _add_bytes(a, "/etc/evil.png", PNG), "absolute path"),
    (lambda a: (_add_bytes(a, "c/0.png", PNG), _add_bytes(a, "c/1.png", kind=tarfile.SYMTYPE, link="/etc/passwd")), "is a link"),
    (lambda a: (_add_bytes(a, "c/0.png", PNG), _add_bytes(a, "c/1.png", kind=tarfile.LNKTYPE, link="c/0.png")), "is a link"),
    (lambda a: _add_bytes(a, "c/fifo.png", kind=tarfile.FIFOTYPE), "not a plain file"),
])
def test_hostile_tar_members_are_refused(tmp_path, capsys, build, needle) -> None:
    archive = _tar_with(tmp_path, build)
    with pytest.raises(DataError, match=needle):
        scan_image_folder(archive)
    target = tmp_path / "out.h5"
    code, out, err = run_cli(["extract", CHECKPOINT, "--data", archive, "-o", target], capsys)
    assert code == 2 and out == "" and not target.exists() and not list(tmp_path.glob("out.h5*"))
    assert len(err.strip().splitlines()) == 1 and needle in err


def test_zip_with_a_symlink_or_dotdot_is_refused(tmp_path) -> None:
    target = tmp_path / "bad.zip"
    with zipfile.ZipFile(target, "w") as archive:
        info = zipfile.ZipInfo("c/link.png")
        info.external_attr = (0o120777 << 16)
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match="symbolic link"):
        scan_image_folder(target)
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("c/../../x.png", PNG)
    with pytest.raises(DataError, match="outside the archive"):
        scan_image_folder(target)


@pytest.mark.parametrize("name", ["random.tar", "random.tar.gz", "random.zip"])
def test_random_bytes_named_as_an_archive_are_refused(tmp_path, capsys, name) -> None:
    target = tmp_path / name
    target.write_bytes(bytes(range(256)) * 40)
    code, out, err = run_cli(["stability", CHECKPOINT, "--data", target, "--format", "json"], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "not a readable" in err


def test_archive_without_class_folders(tmp_path) -> None:
    archive = _tar_with(tmp_path, lambda a: _add_bytes(a, "loose.png", PNG))
    with pytest.raises(DataError, match="no class folders"):
        scan_image_folder(archive)


# --------------------------------------------------------------------------- #26: duplicates, decoded-size cap


def test_a_member_name_given_twice_is_refused(tmp_path, capsys) -> None:
    archive = _tar_with(tmp_path, lambda a: (_add_bytes(a, "c/0.png", PNG), _add_bytes(a, "d/0.png", PNG),
                                             _add_bytes(a, "c/0.png", PNG[::-1])))
    with pytest.raises(DataError, match="member 'c/0.png' appears twice"):
        scan_image_folder(archive)
    target = tmp_path / "dup.zip"
    with zipfile.ZipFile(target, "w") as packed, pytest.warns(UserWarning, match="Duplicate name"):
        packed.writestr("c/0.png", PNG)
        packed.writestr("c/0.png", PNG)
    with pytest.raises(DataError, match="appears twice"):
        scan_image_folder(target)


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_a_member_larger_than_the_cap_is_never_read_whole(suffix, tmp_path, monkeypatch) -> None:
    import auditor.io.archive as archive_module
    from auditor.io.images import ImageDataset, ImageFailure, Preprocessing, select_samples

    target = tmp_path / f"bomb{suffix}"
    big = b"\0" * (3 * 2**20)  # 3 MiB of zeros: a few kB packed
    if suffix == ".zip":
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as packed:
            packed.writestr("c/0.png", PNG)
            packed.writestr("c/1.png", big)
    else:
        with tarfile.open(target, "w:gz") as packed:
            _add_bytes(packed, "c/0.png", PNG)
            _add_bytes(packed, "c/1.png", big)
    assert target.stat().st_size < 64 * 1024
    monkeypatch.setattr(archive_module, "MAX_MEMBER_BYTES", 2**20)
    index = scan_image_folder(target)
    assert len(index.reader("c/0.png")) == len(PNG)
    with pytest.raises(OSError, match="decodes to more than 1 MiB .3 MiB., the cap for one image"):
        index.reader("c/1.png")  # refused on its declared size, before a byte is decoded
