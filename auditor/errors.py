"""Error hierarchy and exit codes.

The library raises :class:`AuditorError` subclasses; only the CLI maps them to
one line on stderr and exit code 2 (see docs/design.md, "Exit codes").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "ExitCode",
    "Remedy",
    "AuditorError",
    "UsageError",
    "InputError",
    "CheckpointError",
    "ArchitectureError",
    "DataError",
    "StoreError",
    "OutputError",
]


class ExitCode(IntEnum):
    """Process exit codes (contract)."""

    OK = 0
    RULE_FAILED = 1
    ERROR = 2
    INTERRUPTED = 130


@dataclass(frozen=True)
class Remedy:
    """The argument of the library call that resolves an error, e.g. ``overwrite=True``.

    A hint names it with the placeholder ``{remedy}``; a Python caller reads
    ``overwrite=True``, the command line spells it as its flag (``--overwrite``).
    ``value=None`` stands for a value the caller chooses (``arch=...``,
    ``--arch``); ``value=False`` turns a flag off (``strict=False``, "without
    ``--strict``").
    """

    argument: str
    value: object = True

    def python(self) -> str:
        """``argument=value`` (``argument=...`` for a value of the caller's choosing, ``value=None``)."""
        return f"{self.argument}=..." if self.value is None else f"{self.argument}={self.value!r}"


class AuditorError(Exception):
    """Base class of every error resdyn reports to a user.

    Parameters
    ----------
    message : str
        What is wrong, in one line.
    hint : str, optional
        What to do next; printed after the message. ``{remedy}`` in it stands for
        ``remedy``, spelled for the reader (see :meth:`one_line`).
    remedy : Remedy, optional
        The argument that resolves the error, for callers that act on it.
    """

    def __init__(self, message: str, *, hint: str | None = None, remedy: Remedy | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.remedy = remedy

    def one_line(self, spell: Callable[[Remedy], str] = Remedy.python) -> str:
        """The message and hint on a single line; ``spell`` writes the remedy (default ``argument=value``)."""
        text = " ".join(self.message.split())
        if self.hint:
            hint = self.hint
            if self.remedy is not None:
                hint = hint.replace("{remedy}", spell(self.remedy))
            text += " Hint: " + " ".join(hint.split())
        return text


class UsageError(AuditorError):
    """A malformed option, rule or combination of options."""


class InputError(AuditorError):
    """A path that is missing or unreadable, or a value out of range."""


class CheckpointError(InputError):
    """A checkpoint that cannot be read safely or does not match the model."""


class ArchitectureError(InputError):
    """An architecture that is unknown, cannot be inferred or cannot take the input."""


class DataError(InputError):
    """An image folder or sample selection that cannot be used."""


class StoreError(InputError):
    """An HDF5 activation store that is not valid, complete or compatible."""


class OutputError(InputError):
    """An output file or folder that cannot be written (no space, read-only, permission, ...).

    Parameters
    ----------
    path : path-like
        The output the user asked for (not a temporary sibling).
    cause : OSError
        The failure; its ``strerror`` names the cause in the message.
    hint : str, optional
        What to do next (the CLI adds the flag that named the path).
    """

    def __init__(self, path: object, cause: OSError, *, hint: str | None = None) -> None:
        reason = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(f"{path}: cannot write ({reason})",
                         hint=hint or "choose a writable location with enough free space")
        self.path = path
        self.cause = cause
