"""``resdyn inspect`` and ``resdyn archs``."""

from __future__ import annotations

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
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


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
    from rich.table import Table

    table = Table(title="Registered architectures", title_justify="left")
    table.add_column("name", no_wrap=True)
    for column in ("family", "input", "BatchNorm", "shortcuts", "block equation"):
        table.add_column(column)
    for index, spec in enumerate(rows):
        if index and spec.family != rows[index - 1].family:
            table.add_section()
        table.add_row(spec.name, spec.family, str(spec.input_size),
                      "yes" if spec.batchnorm else "no", "yes" if spec.residual else "no (plain)", spec.equation)
    Console().print(table)
