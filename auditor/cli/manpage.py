"""Generate roff man pages from the Typer app itself.

``python -m auditor.cli.manpage man/`` rewrites ``man/resdyn.1`` and one page per
subcommand (``man/resdyn-audit.1`` ...). The tests regenerate the pages and fail
when a committed page is out of date or a command lacks help text.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Any

__all__ = ["render_pages", "write_pages"]

_EXIT_STATUS = [
    ("0", "The command ran and every --fail-on rule held."),
    ("1", "The command ran and a --fail-on rule failed."),
    ("2", "Usage, input or internal error; one line on standard error says what and what to do."),
    ("130", "Interrupted."),
]
_ENVIRONMENT = [
    ("RESDYN_DEBUG", "Set to 1 to print the full traceback of an error instead of one line."),
    ("CI", "When set, no progress bars are drawn."),
]
_EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "": [
        ("Audit the bundled example:", "resdyn audit fixtures/resnet8-digits.safetensors --data fixtures/digits"),
        ("Gate a checkpoint in CI:", "resdyn audit model.safetensors --format json --fail-on 'max_kappa_linear_residual>1e4'"),
    ],
    "inspect": [("Show the anatomy of a checkpoint:", "resdyn inspect model.safetensors --input-size 224")],
    "archs": [("List the architectures --arch accepts:", "resdyn archs")],
    "data": [("Check the data sources of ./resdyn.toml before a long run:", "resdyn data --format json")],
    "condition": [("Exact block condition numbers as JSON:", "resdyn condition model.safetensors --format json -o cond.json")],
    "extract": [("Store stage activations:", "resdyn extract model.safetensors --data images/ -o acts.h5 --per-class 50")],
    "angles": [("Median principal angles per stage:", "resdyn angles acts.h5 --plot angles.png"),
               ("Several models side by side, from their checkpoints (Figure 5):",
                "resdyn angles resnet20.pt resnet56.pt resnet110.pt --data images/ --cache cache/ --plot depths.png")],
    "trajectory": [("Angles across training epochs:", "resdyn trajectory checkpoints/ --data images/ --plot traj.png"),
                   ("Three runs side by side, with the blocks' kappas over training:",
                    "resdyn trajectory runs/plain runs/nobn runs/bn --data images/ --condition --cache cache/ "
                    "--plot angles.png --plot-condition kappas.png")],
    "stability": [("Perturbation growth per block:", "resdyn stability model.safetensors --data images/ --eps 1e-3")],
    "audit": [("Everything, with a rule:", "resdyn audit model.safetensors --data images/ --fail-on 'lemma1_lower_violations>0'")],
    "compare": [("Two reports side by side:", "resdyn compare bn.json nobn.json")],
    "metrics": [("The metrics of --fail-on rules, as JSON:", "resdyn metrics --format json")],
    "man": [("This page's command as plain text:", "resdyn man man"),
            ("Install a page where man(1) finds it:", "resdyn man audit --roff > ~/.local/share/man/man1/resdyn-audit.1")],
}


def _escape(text: str) -> str:
    text = " ".join(str(text).split())
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return ("\\&" + text) if text.startswith((".", "'")) else text


def _section(title: str) -> list[str]:
    return [f".SH {title}"]


def _param_lines(param: Any) -> list[str]:
    if param.param_type_name == "argument":
        return [".TP", f"\\fB{_escape(param.name.upper())}\\fR", _escape(getattr(param, "help", "") or "")]
    names = ", ".join(f"\\fB{_escape(o)}\\fR" for o in [*param.opts, *param.secondary_opts])
    long = next((o for o in param.opts if o.startswith("--")), param.opts[0])
    metavar = "" if param.is_flag else f" \\fI{_escape(long.lstrip('-').upper().replace('-', '_'))}\\fR"
    lines = [".TP", names + metavar]
    help_text = param.help or ""
    default = param.default
    if not param.is_flag and default not in (None, "", ()) and not callable(default):
        value = getattr(default, "value", default)
        help_text += f" [default: {value}]"
    if isinstance(default, Enum):
        help_text += " [choices: " + ", ".join(str(c.value) for c in type(default)) + "]"
    paragraph, marked, block = help_text.partition("\n\n\b\n")  # click's mark: lines kept as written
    lines.append(_escape(paragraph))
    for line in block.splitlines() if marked else []:
        lines += [".br", _escape(line)]
    return lines


def _page(name: str, command: Any, version: str, subcommands: dict[str, Any] | None) -> str:
    full = "resdyn" + (f" {name}" if name else "")
    title = "RESDYN" + (f"\\-{name.upper()}" if name else "")
    summary = (command.help or "").strip().splitlines()[0] if command.help else ""
    lines = [
        f'.TH {title} 1 "" "resdyn {version}" "resdyn manual"',
        *_section("NAME"),
        f"{_escape(full.replace(' ', '-'))} \\- {_escape(summary)}",
        *_section("SYNOPSIS"),
        f"\\fB{_escape(full)}\\fR [\\fIOPTIONS\\fR]"
        + ("" if name == "" else " " + " ".join(f"\\fI{p.name.upper()}\\fR" for p in command.params if p.param_type_name == "argument"))
        + (" \\fICOMMAND\\fR" if subcommands else ""),
        *_section("DESCRIPTION"),
        _escape(command.help or ""),
    ]
    options = [p for p in command.params if p.param_type_name == "option" and not p.hidden]
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    if arguments:
        lines += _section("ARGUMENTS")
        for param in arguments:
            lines += _param_lines(param)
    if options:
        lines += _section("OPTIONS")
        for param in options:
            lines += _param_lines(param)
    if subcommands:
        lines += _section("COMMANDS")
        for sub_name, sub in subcommands.items():
            lines += [".TP", f"\\fBresdyn {sub_name}\\fR", _escape((sub.help or "").strip().splitlines()[0]),
                      f"See \\fBresdyn\\-{sub_name}\\fR(1)."]
    lines += _section("EXIT STATUS")
    for code, meaning in _EXIT_STATUS:
        lines += [".TP", f"\\fB{code}\\fR", _escape(meaning)]
    lines += _section("ENVIRONMENT")
    for var, meaning in _ENVIRONMENT:
        lines += [".TP", f"\\fB{var}\\fR", _escape(meaning)]
    lines += _section("FILES")
    lines += [_escape("Checkpoints: .safetensors, or .pt/.pth/.th/.bin read with torch.load(weights_only=True), "
                      "or a Hugging Face / timm folder (config.json beside model.safetensors). "
                      "Data: a class-per-folder tree, a .tar/.tar.gz/.zip of one, a path,label CSV, or a source "
                      "[data.NAME] (keys path, classes, per-class, seed, preset, size, mean, std) in resdyn.toml "
                      "or [tool.resdyn.data.NAME] in pyproject.toml. "
                      "Activation stores: HDF5 files with format=resdyn-activations. "
                      "Rules: resdyn.toml or [tool.resdyn] in pyproject.toml (fail-on = [...]).")]
    lines += _section("EXAMPLES")
    for text, example in _EXAMPLES.get(name, []):
        lines += [".PP", _escape(text), ".PP", ".RS", f"\\f(CW{_escape(example)}\\fR", ".RE"]
    if name:
        lines += _section("SEE ALSO") + ["\\fBresdyn\\fR(1)"]
    return "\n".join(lines) + "\n"


def render_pages() -> dict[str, str]:
    """File name -> roff text for ``resdyn`` and each subcommand.

    Raises
    ------
    ValueError
        When a command or option has no help text.
    """
    import typer

    from .._version import __version__
    from . import app

    group = typer.main.get_command(app)
    commands = dict(sorted(group.commands.items()))  # type: ignore[attr-defined]
    missing = [n for n, c in commands.items() if not c.help]
    missing += [f"{n} {p.opts[0]}" for n, c in commands.items() for p in c.params
                if p.param_type_name == "option" and not p.help]
    if missing:
        raise ValueError("commands or options without help text: " + ", ".join(missing))
    pages = {"resdyn.1": _page("", group, __version__, commands)}
    for name, command in commands.items():
        pages[f"resdyn-{name}.1"] = _page(name, command, __version__, None)
    return pages


def write_pages(directory: Path) -> list[Path]:
    """Write every page into ``directory``; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in render_pages().items():
        path = directory / file_name
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "man")
    for page in write_pages(target):
        print(page)
