"""The ``data`` report: every named data source of a project and what it resolves to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import AuditorError, UsageError
from ..io.data_sources import DataSource, load_data_sources
from ..io.images import images_per_class, scan_image_folder, select_samples
from ..report.data_view import data_document

__all__ = ["describe_source", "data_sources"]


def describe_source(source: DataSource) -> dict[str, Any]:
    """A source's entry: its keys, and the classes and images its path holds (or why it cannot be read)."""
    entry: dict[str, Any] = {"name": source.name, "path": str(source.path),
                             **{k: list(v) if isinstance(v, tuple) else v for k, v in source.options.items()}}
    try:
        index = scan_image_folder(source.path, source.options.get("classes"))
        entry.update(classes=list(index.classes), images_per_class=images_per_class(index.classes, index.samples),
                     images=len(index.samples))
        select_samples(index, source.options.get("per_class"), source.options.get("seed", 0))
        entry["ok"] = True
    except AuditorError as exc:
        entry.update(ok=False, error=exc.one_line())
    return entry


def data_sources(folder: Path | None = None) -> dict[str, Any]:
    """The ``data`` report of the sources declared in ``folder``'s resdyn.toml or pyproject.toml.

    Parameters
    ----------
    folder : Path, optional
        Where the configuration file is looked up (default: the current folder).

    Returns
    -------
    dict
        The report; each source's entry has ``ok`` and, when it cannot be used, ``error``.

    Raises
    ------
    UsageError
        No configuration file declares a source; a malformed one.
    """
    sources, file = load_data_sources(folder)
    if file is None:
        raise UsageError("no data sources: neither ./resdyn.toml has [data.NAME] tables nor ./pyproject.toml "
                         "[tool.resdyn.data.NAME]", hint="declare one with path = \"folder\" (see 'resdyn man data')")
    return data_document(file, [describe_source(source) for source in sources.values()])
