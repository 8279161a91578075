"""resdyn's section of a configuration file: ``resdyn.toml`` or ``[tool.resdyn]`` in ``pyproject.toml``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UsageError

__all__ = ["CONFIG_FILES", "resdyn_section"]

# Searched in this order in the current folder (fail-on rules, data sources).
CONFIG_FILES = ("resdyn.toml", "pyproject.toml")


def resdyn_section(path: Path) -> dict[str, Any] | None:
    """The resdyn settings in ``path``.

    A ``pyproject.toml`` keeps them under ``[tool.resdyn]`` (None when it has
    none); a ``resdyn.toml`` holds them at its top level, or under
    ``[tool.resdyn]`` too.

    Raises
    ------
    UsageError
        An unreadable file, invalid or too deeply nested TOML, a ``tool`` or
        ``tool.resdyn`` that is not a table.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML ({' '.join(str(exc).split())})") from None
    except RecursionError:  # tables or arrays nested thousands deep
        raise UsageError(f"{path}: not valid TOML (nested too deeply)") from None
    tool = data.get("tool", {})
    if not isinstance(tool, dict):
        raise UsageError(f"{path}: 'tool' must be a table, got {type(tool).__name__} {tool!r:.40}",
                         hint="resdyn's settings go under [tool.resdyn]")
    section = tool.get("resdyn")
    if section is not None and not isinstance(section, dict):
        raise UsageError(f"{path}: 'tool.resdyn' must be a table, got {type(section).__name__} {section!r:.40}",
                         hint="write the settings as keys under [tool.resdyn]")
    return section if path.name == "pyproject.toml" else (data if section is None else section)
