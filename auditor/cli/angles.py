"""``resdyn angles``: median principal angles per stage from an activation store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ._data_options import ClassesOpt, SeedOpt
from ._options import (
    CenterOpt, Format, FormatOpt, MaxPairsOpt, NoProgressOpt, OutputOpt, PlotOpt, StagesOpt, SubspaceOpt, split_list,
)

__all__ = ["register"]

StoreArg = Annotated[Path, typer.Argument(help="Activation store written by 'resdyn extract'.", exists=True, dir_okay=False)]


def _tables(doc: dict[str, Any]) -> list[Any]:
    from rich.text import Text

    from ..report.angles_view import angles_table

    head = Text(f"{doc['store']['path']}  ({doc['store']['arch']}, {doc['store']['samples']} samples)")
    note = "options: " + ", ".join(f"{k}={v}" for k, v in doc["config"].items())
    return [head, *angles_table(doc["stages"], note=note)]


def _markdown(doc: dict[str, Any]) -> str:
    from ..report.angles_view import angles_markdown_table

    return f"## resdyn angles\n\nStore `{doc['store']['path']}` ({doc['store']['arch']})\n\n" + angles_markdown_table(doc["stages"])


def angles_command(
    store_path: StoreArg,
    stages: StagesOpt = None,
    classes: ClassesOpt = None,
    center: CenterOpt = False,
    subspace: SubspaceOpt = None,
    max_pairs: MaxPairsOpt = None,
    seed: SeedOpt = 0,
    plot: PlotOpt = None,
    fmt: FormatOpt = Format.table,
    output: OutputOpt = None,
    no_progress: NoProgressOpt = False,
) -> None:
    """Median principal angles within and between classes at every stage (the paper's Definition 1)."""
    from ..tasks.geometry import separation_warning, store_geometry
    from ._output import emit, progress_bar

    with progress_bar("angles", enabled=not no_progress and fmt is not Format.json) as update:
        result = store_geometry(
            store_path, stages=split_list(stages), classes=split_list(classes), center=center,
            max_pairs=max_pairs, seed=seed, subspace_k=subspace, progress=update,
        )
    document = result.to_document()
    entries = result.stages

    undefined = separation_warning(entries)
    if undefined:
        from ._output import warn

        warn(undefined)
    if plot is not None:
        from ..report.plots import plot_angles_by_stage

        plot_angles_by_stage(entries, plot, title=f"Median principal angles, {document['store']['arch']}")
    emit(document, fmt, output, table=_tables, markdown=_markdown)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("angles")(angles_command)
