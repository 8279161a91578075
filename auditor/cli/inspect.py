"""``resdyn inspect`` and ``resdyn archs``."""

from __future__ import annotations

from ._options import ArchOpt, CheckpointArg, Format, FormatOpt, InputSizeOpt, OutputOpt

__all__ = ["inspect_command", "archs_command"]

# The library (torch) is imported in the command bodies, so that ``resdyn --help`` stays instant.


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
    from ..report.markdown import inspect_markdown
    from ..report.sections import inspect_document
    from ..report.tables import inspect_tables
    from ..subject import open_subject
    from ._output import emit

    subject = open_subject(checkpoint, arch=arch, input_size=size)
    emit(inspect_document(subject), fmt, output, table=inspect_tables, markdown=inspect_markdown)


def archs_command(fmt: FormatOpt = Format.table) -> None:
    """List the registered architectures by family, with each block's equation where known (use one with --arch)."""
    from ..models.registry import get_arch, list_models
    from ..report.archs_view import archs_entries, archs_table, sorted_specs

    rows = sorted_specs(get_arch(name) for name in list_models())
    if fmt is Format.json:
        import json

        print(json.dumps(archs_entries(rows), indent=2))
        return
    from rich.console import Console

    from ..report.fit import fitted

    Console().print(fitted(archs_table(rows)))
