"""``resdyn inspect`` and ``resdyn archs``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._options import ArchOpt, CheckpointArg, Format, FormatOpt, InputSizeOpt, OutputOpt

if TYPE_CHECKING:
    from ..subject import Subject

__all__ = ["inspect_command", "archs_command", "inspect_document"]

# The library (torch) is imported in the command bodies, so that ``resdyn --help`` stays instant.


def inspect_document(subject: Subject) -> dict[str, Any]:
    """The ``inspect`` report."""
    from ..report.document import report_header
    from ..report.sections import anatomy_sections

    return {
        **report_header("inspect", subject, input_shape=False),  # input_shape comes with the anatomy
        "input_size_source": subject.input_size_source,
        **anatomy_sections(subject.anatomy),
    }


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
    from ..report.tables import inspect_tables
    from ..subject import open_subject, parse_input_size
    from ._output import emit

    subject = open_subject(checkpoint, arch=arch, input_size=parse_input_size(input_size))
    emit(inspect_document(subject), fmt, output, table=inspect_tables, markdown=_markdown)


def archs_command(fmt: FormatOpt = Format.table) -> None:
    """List the registered architectures (use one with --arch)."""
    from ..models.registry import get_arch, list_models

    rows = [get_arch(name) for name in list_models()]
    if fmt is Format.json:
        import json

        print(json.dumps([{"name": s.name, "family": s.family, "input_size": s.input_size,
                           "batchnorm": s.batchnorm, "residual": s.residual} for s in rows], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Registered architectures", title_justify="left")
    for column in ("name", "family", "input", "BatchNorm", "shortcuts"):
        table.add_column(column)
    for spec in rows:
        table.add_row(spec.name, spec.family, str(spec.input_size),
                      "yes" if spec.batchnorm else "no", "yes" if spec.residual else "no (plain)")
    Console().print(table)
