"""Values that are infinite, or unknown, in a report that JSON must keep finite.

JSON has no ``Infinity``: a field whose true value is +-inf (the condition
number of a singular operator) is written ``null``, its ``*_reason`` says why,
and the object's ``infinite`` map names it with its sign::

    {"kappa_linear_residual": null,
     "kappa_linear_residual_reason": "the residual block is singular (...)",
     "infinite": {"kappa_linear_residual": "inf"}}

A ``null`` that the ``infinite`` map does not name is unknown (extremes that did
not converge, a section that did not run), never a number. :func:`aggregate`
takes maxima and medians over such entries the same way for the summaries, the
``--fail-on`` rules and ``compare``:

- ``max``: ``+inf`` as soon as one entry is infinite (whatever the others);
  otherwise unknown as soon as one entry is unknown;
- ``median``: unknown as soon as one entry is unknown; otherwise the median of
  the values sorted with ``+inf`` last, so a few singular blocks move it by a
  place or two and it is ``+inf`` only when half of the entries or more are;
- ``min``: unknown as soon as one entry is unknown.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

__all__ = ["INFINITE", "Measured", "entry_value", "names", "aggregate", "put", "shown"]

INFINITE = "infinite"  # the key of the map that names null fields standing for +inf / -inf
_NAMES_SHOWN = 5


class Measured(NamedTuple):
    """A value: a number (``inf`` / ``-inf`` allowed), or None and why."""

    value: float | None
    reason: str | None = None

    @property
    def infinite(self) -> bool:
        return self.value is not None and math.isinf(self.value)


def entry_value(entry: Mapping[str, Any], key: str) -> Measured:
    """``entry[key]``: its number, ``+-inf`` where the entry's ``infinite`` map names it, else None and why."""
    value = entry.get(key)
    reason = entry.get(f"{key}_reason")
    if value is not None:
        return Measured(float(value))
    sign = (entry.get(INFINITE) or {}).get(key)
    if sign in ("inf", "-inf"):
        return Measured(float(sign), reason)
    return Measured(None, reason or f"no {key}")


def names(items: Sequence[str]) -> str:
    """``a, b, c`` (the first five, then how many more)."""
    shown_names = ", ".join(items[:_NAMES_SHOWN])
    return shown_names + (f" and {len(items) - _NAMES_SHOWN} more" if len(items) > _NAMES_SHOWN else "")


def aggregate(entries: Sequence[Mapping[str, Any]], key: str, how: Callable[[list[float]], float]) -> Measured:
    """``how`` (``max``, ``min`` or ``statistics.median``) of ``key`` over named entries (module docstring).

    Returns
    -------
    Measured
        The number (``inf`` where infinite entries decide it) with, when not a
        finite number, the reason naming the entries responsible.
    """
    if not entries:
        return Measured(None, "no entries")
    measured = [(str(e.get("name", "?")), entry_value(e, key)) for e in entries]
    infinite = [name for name, m in measured if m.infinite]
    unknown = [(name, m.reason) for name, m in measured if m.value is None]
    why_infinite = f"infinite: {len(infinite)} of {len(measured)} blocks singular ({names(infinite)})"
    if how is max and infinite:
        return Measured(math.inf, why_infinite)
    if unknown:
        name, reason = unknown[0]
        more = f" (and {len(unknown) - 1} more without a value)" if len(unknown) > 1 else ""
        return Measured(None, f"undefined: {name}: {reason}{more}")
    value = float(how(sorted(m.value for _, m in measured)))  # type: ignore[type-var]
    if math.isnan(value):
        return Measured(None, "undefined: the values are not numbers")
    return Measured(value, why_infinite if math.isinf(value) else None)


def put(target: dict[str, Any], key: str, measured: Measured) -> None:
    """Write ``measured`` under ``key`` the JSON way: a finite number, or null with ``key_reason`` (and ``infinite``)."""
    if measured.value is not None and math.isfinite(measured.value):
        target[key] = measured.value
        return
    target[key] = None
    if measured.reason:
        target[f"{key}_reason"] = measured.reason
    if measured.infinite:
        target.setdefault(INFINITE, {})[key] = "inf" if measured.value > 0 else "-inf"  # type: ignore[operator]


def shown(entry: Mapping[str, Any], key: str, format_number: Callable[[float], str], missing: str = "-") -> str:
    """The text of ``entry[key]`` in a table: the number, ``inf`` / ``-inf``, or ``missing``."""
    value = entry.get(key)
    if value is not None:
        return format_number(value)
    sign = (entry.get(INFINITE) or {}).get(key)
    return sign if sign in ("inf", "-inf") else missing

