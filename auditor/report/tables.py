"""Rich renderers of report documents (a list of renderables per command)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table
from rich.text import Text

__all__ = ["inspect_tables", "header_text", "fmt_shape", "fmt_num"]


def fmt_shape(shape: Any) -> str:
    """``[16, 32, 32]`` -> ``16x32x32``."""
    return "x".join(str(s) for s in shape) if shape else "-"


def fmt_num(value: float | None, digits: int = 4) -> str:
    """Compact number; ``-`` for missing values."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e5 or magnitude < 1e-3:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def header_text(doc: Mapping[str, Any]) -> Text:
    ck = doc["checkpoint"]
    text = Text()
    text.append(f"{ck['path']}", style="bold")
    text.append(f"  {ck['format']}  sha256 {ck['sha256'][:12]}\n")
    text.append(f"architecture {ck['arch']}", style="bold")
    text.append(f" ({ck['arch_source']}: {ck['arch_reason']})\n")
    text.append(
        f"{ck['parameters']:,} parameters, {ck['num_classes']} classes, "
        f"input {fmt_shape(doc['input_shape'])}"
    )
    if ck.get("converted_from"):
        text.append(f"\nweights stored as {ck['converted_from']}, analysed as float32", style="yellow")
    return text


def _conv_summary(conv: Mapping[str, Any]) -> str:
    k = "x".join(map(str, conv["kernel"]))
    s = conv["stride"][0]
    text = f"{conv['name'].rpartition('.')[2]} {conv['in_channels']}->{conv['out_channels']} {k}"
    if s != 1:
        text += f"/s{s}"
    if conv["groups"] != 1:
        text += f" g{conv['groups']}"
    return text


def inspect_tables(doc: Mapping[str, Any]) -> list[Any]:
    """Header, blocks table, stages table, layers table."""
    out: list[Any] = [header_text(doc)]
    blocks = Table(title="Residual blocks", title_justify="left")
    for column in ("block", "stage", "convolutions", "BN", "shortcut", "input", "output"):
        blocks.add_column(column)
    for block in doc["blocks"]:
        blocks.add_row(
            block["name"],
            block["stage"],
            ", ".join(_conv_summary(c) for c in block["convs"]),
            "yes" if block["batchnorm"] else "no",
            block["shortcut"],
            fmt_shape(block["input_shape"]),
            fmt_shape(block["output_shape"]),
        )
    out.append(blocks if doc["blocks"] else Text("no residual blocks found"))
    stages = Table(title="Stages (before each down-sampling)", title_justify="left")
    for column in ("stage", "captured at", "shape"):
        stages.add_column(column)
    for stage in doc["stages"] + ([doc["penultimate"]] if doc.get("penultimate") else []):
        stages.add_row(stage["name"], stage["module_path"], fmt_shape(stage["shape"]))
    out.append(stages)
    layers = Table(title="Conv and linear layers", title_justify="left")
    for column in ("layer", "kind", "in->out", "kernel", "stride", "pad", "input", "output"):
        layers.add_column(column)
    for layer in doc["layers"]:
        layers.add_row(
            layer["name"], layer["kind"], f"{layer['in_channels']}->{layer['out_channels']}",
            fmt_shape(layer["kernel"]), str(layer["stride"][0]), str(layer["padding"][0]),
            fmt_shape(layer["input_shape"]), fmt_shape(layer["output_shape"]),
        )
    out.append(layers)
    for note in doc.get("notes", []):
        out.append(Text(f"note: {note}", style="yellow"))
    return out
