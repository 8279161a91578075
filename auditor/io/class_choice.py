"""The classes an image index uses: all it knows, or the ones asked for, checked."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import DataError

__all__ = ["choose_classes"]


def choose_classes(known: Sequence[str], classes: Sequence[str] | None, where: str, absent: str) -> tuple[str, ...]:
    """The classes to index, in label order.

    Parameters
    ----------
    known : sequence of str
        The classes the source holds, sorted.
    classes : sequence of str or None
        The classes asked for, in the order their labels take; None: every known class.
    where : str
        The source (folder, archive, labels file), named in the messages.
    absent : str
        How a missing class is described, e.g. ``"no class folder"``.

    Raises
    ------
    DataError
        An empty list, a class listed twice, or a class the source does not hold.
    """
    if classes is None:
        return tuple(known)
    chosen = [str(c) for c in classes]
    if not chosen:
        raise DataError("the list of classes is empty", hint=f"known classes: {', '.join(known)}")
    twice = sorted({c for c in chosen if chosen.count(c) > 1})
    if twice:
        raise DataError(f"class listed more than once: {', '.join(twice)}")
    missing = [c for c in chosen if c not in set(known)]
    if missing:
        raise DataError(f"{where}: {absent} {', '.join(repr(m) for m in missing)}",
                        hint=f"known classes: {', '.join(known)}")
    return tuple(chosen)
