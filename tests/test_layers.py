"""The package's layers: imports point down (cli -> tasks -> report / analysis -> io -> models -> errors)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "auditor"


def _imported_modules(path: Path) -> set[str]:
    """The modules ``path`` imports, anywhere in the file, as written (``..models.anatomy``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_io_reads_files_and_knows_no_models() -> None:
    offenders = {
        path.name: sorted(m for m in _imported_modules(path) if m.startswith(("..models", "auditor.models")))
        for path in sorted((PACKAGE / "io").glob("*.py"))
    }
    assert not {name: mods for name, mods in offenders.items() if mods}


def test_images_and_archive_share_the_image_test_without_a_circle() -> None:
    assert ".images" not in _imported_modules(PACKAGE / "io" / "archive.py")
    assert ".image_kinds" in _imported_modules(PACKAGE / "io" / "archive.py")
    assert ".image_kinds" in _imported_modules(PACKAGE / "io" / "images.py")


def test_conditioning_and_the_extremes_share_the_block_algebra_without_a_circle() -> None:
    conditioning = _imported_modules(PACKAGE / "analysis" / "conditioning.py")
    extremes = _imported_modules(PACKAGE / "analysis" / "block_extremes.py")
    assert ".conditioning" not in extremes
    assert ".block_algebra" in conditioning and ".block_algebra" in extremes
    assert ".conditioning" not in _imported_modules(PACKAGE / "analysis" / "block_algebra.py")
