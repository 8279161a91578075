"""The ``archs`` listing: the registered architectures grouped by family, as a table or JSON entries."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["sorted_specs", "archs_entries", "archs_table"]


def _natural(name: str) -> list[Any]:
    """Sort key that orders the numbers in a name by value: resnet14 before resnet110."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


_VARIANT = re.compile(r"(_optb|_plain|_nobn)+$")


def _group_name(base: str) -> str:
    """The row an architecture joins: its name without depth or size (resnet110 -> resnet, regnet_x_8gf -> regnet)."""
    core = base.removeprefix("timm_")
    if not any(c.isdigit() for c in core):
        return core.split("_")[0]
    return re.sub(r"_[a-z]$", "", re.split(r"\d", core, maxsplit=1)[0].rstrip("_"))


def archs_table(specs: Sequence[Any]) -> Any:
    """One row per family and kind: its names in natural order on one line, the variants each has."""
    from rich.table import Table

    groups: dict[tuple[str, str], dict[str, list[Any]]] = {}
    for spec in specs:
        base = _VARIANT.sub("", spec.name)
        groups.setdefault((spec.family, _group_name(base)), {}).setdefault(base, []).append(spec)
    table = Table(title=f"Registered architectures ({len(specs)}; every name: --format json)", title_justify="left")
    for column in ("family", "architectures", "variants", "block equation"):
        table.add_column(column)
    previous = None
    for (family, _), bases in groups.items():
        if previous is not None and family != previous:
            table.add_section()
        variants = sorted({spec.name[len(base):] for base, members in bases.items() for spec in members} - {""},
                          key=lambda v: (v.count("_"), v))
        everywhere = all({spec.name[len(base):] for spec in members} >= set(variants) for base, members in bases.items())
        named = ", ".join(bases) if everywhere else ", ".join(
            f"{base} (+{', '.join(spec.name[len(base):] for spec in members if spec.name != base)})"
            if len(members) > 1 else base for base, members in bases.items())
        equations = list(dict.fromkeys(spec.equation for members in bases.values() for spec in members if spec.equation))
        sizes = sorted({str(spec.input_size) for members in bases.values() for spec in members})
        table.add_row(f"{family} ({'/'.join(sizes)} px)" if family != previous else "", named,
                      ("each also " + ", ".join(variants)) if variants and everywhere else "", "\n".join(equations))
        previous = family
    return table


def sorted_specs(specs: Iterable[Any]) -> list[Any]:
    """The architectures' specs by family, then by name with its numbers in order."""
    return sorted(specs, key=lambda s: (s.family, _natural(s.name)))


def archs_entries(specs: Sequence[Any]) -> list[dict[str, Any]]:
    """One JSON entry per architecture: name, family, input size, BatchNorm, residual, block equation."""
    return [{"name": s.name, "family": s.family, "input_size": s.input_size, "batchnorm": s.batchnorm,
             "residual": s.residual, "equation": s.equation or None} for s in specs]
