"""The JSON document: schema version, JSON-safe numbers, atomic writes.

Non-finite numbers never reach JSON: :func:`json_safe` turns them into
``null`` (callers that know *why* a value is missing add a ``*_reason`` field).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._version import __version__
from ..io.safe_output import safe_output

if TYPE_CHECKING:
    from ..subject import Subject

__all__ = ["SCHEMA_VERSION", "READABLE_VERSIONS", "tool_info", "report_header", "json_safe", "dumps", "atomic_output", "write_atomic", "validate"]

SCHEMA_VERSION = "2"
# Versions whose audit, condition and stability sections this resdyn still reads (compare): 2 changed
# only trajectory's ``series`` (one entry per run) and added fields elsewhere.
READABLE_VERSIONS = ("1", "2")


def tool_info() -> dict[str, str]:
    """The ``tool`` object of every report."""
    return {"name": "resdyn", "version": __version__}


def report_header(command: str, subject: Subject | None = None, *, input_shape: bool = True) -> dict[str, Any]:
    """The first keys of every report: ``schema_version``, ``tool``, ``command``.

    Parameters
    ----------
    command : str
        The command (or task) that wrote the report.
    subject : Subject, optional
        Adds ``checkpoint`` and, with ``input_shape``, the network's ``input_shape``.
    input_shape : bool
        False where the caller places ``input_shape`` itself (``inspect``).

    Returns
    -------
    dict
        A new dict; callers add their sections after these keys (JSON key order).
    """
    header: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "tool": tool_info(), "command": command}
    if subject is not None:
        header["checkpoint"] = subject.checkpoint_section()
        if input_shape:
            header["input_shape"] = list(subject.anatomy.input_shape)
    return header


def json_safe(value: Any) -> Any:
    """Convert dataclasses, numpy scalars/arrays, tuples and paths to JSON values.

    NaN and infinities become ``None``.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return json_safe(value.to_dict())
        return {f.name: json_safe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Path):
        return str(value)
    return value


def dumps(document: Mapping[str, Any]) -> str:
    """Serialise a report: JSON-safe, stable key order as built, no NaN allowed."""
    return json.dumps(json_safe(document), indent=2, allow_nan=False) + "\n"


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed to ``path`` when the block succeeds.

    :func:`auditor.io.safe_output.safe_output`, creating missing folders: a
    device, a folder, a symbolic link or a file the process has open is
    refused; the file gets the umask's mode or keeps the one it replaces.

    Raises
    ------
    OutputError
        Any I/O failure, in the block or around it (no space, read-only,
        permission, path too long, a file where a folder is needed), naming
        ``path``; nothing is left behind.
    """
    with safe_output(path, make_parents=True) as temporary:
        yield temporary


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename (see :func:`atomic_output`).

    Under ``torchrun`` only rank 0 writes; the call does nothing on the others.
    """
    from ..distributed import world

    if not world().is_main:
        return
    with atomic_output(path) as temporary:
        temporary.write_bytes(text.encode() if isinstance(text, str) else text)


def schema() -> dict[str, Any]:
    """The JSON Schema shipped with the package."""
    from importlib.resources import files

    return json.loads(files("auditor.report").joinpath("schema.json").read_text())


def validate(document: Mapping[str, Any]) -> None:
    """Validate a report against the shipped JSON Schema (raises ``jsonschema.ValidationError``)."""
    import jsonschema

    jsonschema.validate(json_safe(document), schema())
