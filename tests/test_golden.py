"""Golden renders: the table and Markdown views of fixed reports, compared with committed files.

The inputs are committed JSON reports (``tests/golden/*.json``, written once by
``resdyn audit`` / ``resdyn inspect`` on the bundled fixture, the data root made
relative), so a change of the numbers never moves these tests; a change of the
rendering does. After an intended change of a view, regenerate the expected
files and review the diff::

    RESDYN_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

Tables are rendered as rich's own tests do: a fixed-width console without
colour, writing to a string.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from auditor.report.audit_view import audit_markdown, audit_tables
from auditor.report.markdown import inspect_markdown
from auditor.report.models_view import models_markdown, models_tables
from auditor.report.tables import inspect_tables
from auditor.report.trajectory_view import trajectory_markdown, trajectory_tables

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("RESDYN_UPDATE_GOLDEN") == "1"


def _table_text(renderables: list[Any], width: int = 120) -> str:
    stream = io.StringIO()
    console = Console(width=width, force_terminal=True, color_system=None, file=stream, legacy_windows=False)
    for renderable in renderables:
        console.print(renderable)
    return stream.getvalue()


VIEWS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "audit.table.txt": ("audit.json", lambda doc: _table_text(audit_tables(doc))),
    "audit.md": ("audit.json", audit_markdown),
    "inspect.table.txt": ("inspect.json", lambda doc: _table_text(inspect_tables(doc))),
    "inspect.md": ("inspect.json", inspect_markdown),
    # trajectory.json: resdyn trajectory on the three bundled runs at epochs 0 and 6 with --condition;
    # angles-models.json: resdyn angles on two bundled checkpoints (#28); rendered 140 wide
    "trajectory.table.txt": ("trajectory.json", lambda doc: _table_text(trajectory_tables(doc), 140)),
    "trajectory.md": ("trajectory.json", trajectory_markdown),
    "angles-models.table.txt": ("angles-models.json", lambda doc: _table_text(models_tables(doc), 140)),
    "angles-models.md": ("angles-models.json", models_markdown),
}


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_render_matches_the_golden_file(name: str) -> None:
    source, render = VIEWS[name]
    document = json.loads((GOLDEN / source).read_text())
    text = render(document)
    expected = GOLDEN / name
    if UPDATE:
        expected.write_text(text)
    assert expected.exists(), f"{expected} missing: run with RESDYN_UPDATE_GOLDEN=1 to write it"
    assert text == expected.read_text(), f"{name} changed; if intended, regenerate (see the module docstring)"


def test_golden_inputs_are_valid_reports() -> None:
    """The fixed inputs follow the shipped schema, so the views are tested on real shapes."""
    from auditor.report.document import validate

    for source in {source for source, _ in VIEWS.values()}:
        validate(json.loads((GOLDEN / source).read_text()))
    trajectory = json.loads((GOLDEN / "trajectory.json").read_text())
    assert [run["name"] for run in trajectory["series"]] == ["resnet8", "resnet8_nobn", "resnet8_plain"]
    assert len(json.loads((GOLDEN / "angles-models.json").read_text())["models"]) == 2
