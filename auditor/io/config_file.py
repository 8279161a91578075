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
        An unreadable file or invalid TOML.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML ({' '.join(str(exc).split())})") from None
    tool = data.get("tool", {}).get("resdyn")
    return tool if path.name == "pyproject.toml" else (data if tool is None else tool)
