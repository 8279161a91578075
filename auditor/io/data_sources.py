"""Named data sources: ``[data.NAME]`` in ``resdyn.toml`` or ``[tool.resdyn.data.NAME]`` in ``pyproject.toml``.

A source names a labeled image folder once, with how to sample and prepare it::

    [data.imagenet-subset]
    path = "data/val"            # relative to the file that declares it
    classes = ["n01440764", "n01443537"]
    per-class = 20
    seed = 0
    preset = "imagenet"          # or size / mean / std
    size = 224
    mean = [0.485, 0.456, 0.406]
    std = [0.229, 0.224, 0.225]

``--data NAME`` resolves to it when ``NAME`` is not an existing path; options
given on the command line override the source's keys. The files searched are
``./resdyn.toml``, then ``./pyproject.toml`` (the same places as the
``fail-on`` rules); the first one that declares any source is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, UsageError
from .config_file import CONFIG_FILES, resdyn_section

__all__ = ["DataSource", "load_data_sources", "resolve_data_source"]

# images.MAX_SEED, the seeds every command takes (not imported: auditor.io.images loads torch)
_MAX_SEED = 2**62 - 1
_KEYS = ("path", "classes", "per-class", "seed", "preset", "size", "mean", "std")


@dataclass(frozen=True)
class DataSource:
    """One declared source.

    Attributes
    ----------
    name : str
    file : Path
        The TOML file that declares it.
    path : Path
        The data, resolved against ``file``'s folder.
    options : dict
        ``classes``, ``per_class``, ``seed``, ``preset``, ``size``, ``mean``,
        ``std`` as :func:`auditor.tasks.images.open_images` takes them (absent keys omitted).
    """

    name: str
    file: Path
    path: Path
    options: dict[str, Any]

    def section(self) -> dict[str, str]:
        """The ``data.source`` object of the JSON report."""
        return {"name": self.name, "file": str(self.file)}


def _tables(candidate: Path) -> dict[str, Any] | None:
    tables = (resdyn_section(candidate) or {}).get("data")
    if tables is None:
        return None
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        where = "[tool.resdyn.data.NAME]" if candidate.name == "pyproject.toml" else "[data.NAME]"
        raise UsageError(f"{candidate}: 'data' must hold tables {where}")
    return tables


def _check(value: Any, ok: bool, where: str, want: str) -> Any:
    if not ok:
        raise UsageError(f"{where} must be {want}, got {value!r}")
    return value


def _parse(name: str, table: dict[str, Any], file: Path) -> DataSource:
    where = f"{file}: [data.{name}]"
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise UsageError(f"{where} has unknown key(s) {', '.join(unknown)}", hint=f"known keys: {', '.join(_KEYS)}")
    if "path" not in table:
        raise UsageError(f"{where} has no 'path'", hint="path = \"folder/with/one/sub-folder/per/class\"")
    raw = _check(table["path"], isinstance(table["path"], str) and table["path"] != "", f"{where} path", "a non-empty string")
    options: dict[str, Any] = {}
    if "classes" in table:
        classes = table["classes"]
        if isinstance(classes, str):
            classes = [c.strip() for c in classes.split(",") if c.strip()]
        _check(classes, isinstance(classes, list) and all(isinstance(c, str) for c in classes),
               f"{where} classes", "a list of class names")
        options["classes"] = list(classes)
    for key, option in (("per-class", "per_class"), ("size", "size"), ("seed", "seed")):
        if key in table:
            value = table[key]
            minimum = 0 if key == "seed" else 1
            _check(value, isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
                   f"{where} {key}", f"an integer >= {minimum}")
            options[option] = value
    if "preset" in table:
        from .images import PRESETS

        _check(table["preset"], table["preset"] in PRESETS, f"{where} preset", f"one of {', '.join(PRESETS)}")
        options["preset"] = table["preset"]
    if options.get("seed", 0) > _MAX_SEED:
        _check(options["seed"], False, f"{where} seed", "an integer below 2**62")
    for key in ("mean", "std"):
        if key in table:
            value = table[key]
            _check(value, isinstance(value, list) and len(value) == 3
                   and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
                   f"{where} {key}", "three numbers")
            # what the commands refuse, refused here too: resdyn data never calls "ok" what extract refuses
            _check(value, all(math.isfinite(v) for v in value), f"{where} {key}", "three finite numbers")
            if key == "std":
                _check(value, all(v > 0 for v in value), f"{where} std", "three positive numbers (std divides)")
            options[key] = tuple(float(v) for v in value)
    path = Path(raw).expanduser()
    return DataSource(name, file, path if path.is_absolute() else file.parent / path, options)


def load_data_sources(start: Path | None = None) -> tuple[dict[str, DataSource], Path | None]:
    """Every source declared in ``start/resdyn.toml``, else ``start/pyproject.toml``.

    Returns
    -------
    sources : dict of str to DataSource
    file : Path or None
        The file read (None when neither declares sources).

    Raises
    ------
    UsageError
        Invalid TOML, an unknown key, a source without ``path``, a value of the wrong type.
    """
    folder = (start or Path.cwd()).resolve()
    for candidate in (folder / name for name in CONFIG_FILES):
        if not candidate.is_file():
            continue
        tables = _tables(candidate)
        if tables is None:
            continue
        return {name: _parse(name, table, candidate) for name, table in tables.items()}, candidate
    return {}, None


def resolve_data_source(text: str | Path, start: Path | None = None) -> DataSource | None:
    """The source ``text`` names, or None when ``text`` is an existing path.

    Raises
    ------
    DataError
        ``text`` is neither an existing path nor a declared source (the hint lists the known ones).
    """
    if Path(text).exists():
        return None
    sources, file = load_data_sources(start)
    if str(text) in sources:
        return sources[str(text)]
    known = (f"sources in {file}: {', '.join(sorted(sources))}" if sources
             else "no [data.NAME] in ./resdyn.toml nor [tool.resdyn.data.NAME] in ./pyproject.toml")
    raise DataError(f"{text}: does not exist, and no data source has that name",
                    hint=f"known {known}" if sources else known)
