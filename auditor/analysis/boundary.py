"""The boundary models of a convolution operator: one vocabulary for the library and the command line.

``circular``: the periodic extension, exactly diagonalized by the 2-D FFT; ``zero``: the zero
padding torch's ``conv2d`` applies (docs/method.md, "Boundaries"). Neither torch nor numpy:
the command line builds its ``--boundary`` choices from :data:`BOUNDARIES` without loading them.
"""

from __future__ import annotations

from ..errors import UsageError

__all__ = ["BOUNDARIES", "DEFAULT_BOUNDARY", "check_boundary"]

BOUNDARIES = ("circular", "zero")
DEFAULT_BOUNDARY = "circular"


def check_boundary(boundary: str) -> None:
    """Refuse a boundary that is not one of :data:`BOUNDARIES` (a :class:`~auditor.errors.UsageError`)."""
    if boundary not in BOUNDARIES:
        raise UsageError(f"boundary {boundary!r} is not one of {', '.join(BOUNDARIES)}")
