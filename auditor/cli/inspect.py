"""``resdyn inspect`` and ``resdyn archs``."""

from __future__ import annotations

import re
from typing import Any

from ._options import ArchOpt, CheckpointArg, Format, FormatOpt, InputSizeOpt, OutputOpt

__all__ = ["inspect_command", "archs_command"]

# The library (torch) is imported in the command bodies, so that ``resdyn --help`` stays instant.


def _markdown(doc: dict[str, Any]) -> str:
    from ..report.markdown import inspect_markdown

    return inspect_markdown(doc)


def inspect_command(
    checkpoint: CheckpointArg,
    arch: ArchOpt = None,
    input_size: InputSizeOpt = None,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
) -> None:
    """Show the architecture, residual blocks, stages and layer shapes of a checkpoint."""
    from ..subject import parse_input_size

    size = parse_input_size(input_size)  # a malformed size fails before torch is imported
    from ..report.sections import inspect_document
    from ..report.tables import inspect_tables
    from ..subject import open_subject
    from ._output import emit

    subject = open_subject(checkpoint, arch=arch, input_size=size)
    emit(inspect_document(subject), fmt, output, table=inspect_tables, markdown=_markdown)


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


def _archs_table(specs: list[Any]) -> Any:
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


def archs_command(fmt: FormatOpt = Format.table) -> None:
    """List the registered architectures by family, with each block's equation where known (use one with --arch)."""
    from ..models.registry import get_arch, list_models

    rows = sorted((get_arch(name) for name in list_models()), key=lambda s: (s.family, _natural(s.name)))
    if fmt is Format.json:
        import json

        print(json.dumps([{"name": s.name, "family": s.family, "input_size": s.input_size,
                           "batchnorm": s.batchnorm, "residual": s.residual, "equation": s.equation or None}
                          for s in rows], indent=2))
        return
    from rich.console import Console

    from ..report.fit import fitted

    Console().print(fitted(_archs_table(rows)))
