"""Table and Markdown views of an ``angles`` report: one model (``store``, ``stages``) or several (``models``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .angles_view import angles_markdown_table, angles_table

__all__ = ["report_models", "model_heading", "models_tables", "models_markdown"]


def report_models(doc: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The report's models: its ``models``, or the one model of a single-model report."""
    if "models" in doc:
        return list(doc["models"])
    name = Path(doc.get("checkpoint", {}).get("path") or doc["store"]["path"] or "store").name
    return [{"name": name, "store": doc["store"], "stages": doc["stages"],
             **({"checkpoint": doc["checkpoint"]["path"]} if "checkpoint" in doc else {})}]


def model_heading(model: Mapping[str, Any]) -> str:
    """``name: path  (arch, N samples)``: the checkpoint's path, or the store's."""
    store = model["store"]
    where = str(model.get("checkpoint") or store["path"])
    named = where if Path(where).name == model["name"] else f"{model['name']}: {where}"
    return f"{named}  ({store['arch']}, {store['samples']} samples)"


def models_tables(doc: Mapping[str, Any]) -> list[Any]:
    """Rich renderables: per model its heading and its angles table."""
    from rich.text import Text

    note = "options: " + ", ".join(f"{k}={v}" for k, v in doc["config"].items())
    out: list[Any] = []
    for model in report_models(doc):
        out.extend([Text(model_heading(model)), *angles_table(model["stages"], note=note)])
    return out


def models_markdown(doc: Mapping[str, Any]) -> str:
    """The Markdown report: per model a heading and its angles table."""
    parts = ["## resdyn angles\n"]
    for model in report_models(doc):
        parts.append(f"### {model_heading(model)}\n\n" + angles_markdown_table(model["stages"]))
    return "\n".join(parts)
