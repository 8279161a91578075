"""Golden renders of the ``trajectory`` and several-model ``angles`` reports (issue #28).

The inputs are committed JSON reports (``tests/golden/trajectory.json``, written by
``resdyn trajectory`` on three bundled runs at epochs 0 and 6 with ``--condition``;
``tests/golden/angles-models.json``, by ``resdyn angles`` on two bundled checkpoints;
the data root made relative). A change of the rendering moves these tests, a change
of the numbers does not. Regenerate after an intended change of a view::

    RESDYN_UPDATE_GOLDEN=1 python -m pytest tests/test_trajectory_golden.py
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

from auditor.report.models_view import models_markdown, models_tables
from auditor.report.trajectory_view import trajectory_markdown, trajectory_tables

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("RESDYN_UPDATE_GOLDEN") == "1"


def _table_text(renderables: list[Any]) -> str:
    stream = io.StringIO()
    console = Console(width=140, force_terminal=True, color_system=None, file=stream, legacy_windows=False)
    for renderable in renderables:
        console.print(renderable)
    return stream.getvalue()


VIEWS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "trajectory.table.txt": ("trajectory.json", lambda doc: _table_text(trajectory_tables(doc))),
    "trajectory.md": ("trajectory.json", trajectory_markdown),
    "angles-models.table.txt": ("angles-models.json", lambda doc: _table_text(models_tables(doc))),
    "angles-models.md": ("angles-models.json", models_markdown),
}


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_render_matches_the_golden_file(name: str) -> None:
    source, render = VIEWS[name]
    text = render(json.loads((GOLDEN / source).read_text()))
    expected = GOLDEN / name
    if UPDATE:
        expected.write_text(text)
    assert expected.exists(), f"{expected} missing: run with RESDYN_UPDATE_GOLDEN=1 to write it"
    assert text == expected.read_text(), f"{name} changed; if intended, regenerate (see the module docstring)"


def test_golden_inputs_are_valid_reports() -> None:
    from auditor.report.document import validate

    trajectory = json.loads((GOLDEN / "trajectory.json").read_text())
    validate(trajectory)
    assert [run["name"] for run in trajectory["series"]] == ["resnet8", "resnet8_nobn", "resnet8_plain"]
    models = json.loads((GOLDEN / "angles-models.json").read_text())
    validate(models)
    assert len(models["models"]) == 2
