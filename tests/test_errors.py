"""Library errors name the argument that resolves them; only the CLI spells it as a flag."""

from __future__ import annotations

from auditor.cli import flag_for
from auditor.errors import Remedy, StoreError, UsageError


def test_remedy_is_spelled_for_python_callers_and_for_the_command_line() -> None:
    error = StoreError("x.h5 already exists", hint="pass {remedy} to replace it", remedy=Remedy("overwrite"))
    assert error.one_line() == "x.h5 already exists Hint: pass overwrite=True to replace it"
    assert error.one_line(flag_for) == "x.h5 already exists Hint: pass --overwrite to replace it"
    assert flag_for(Remedy("save_spectra", "FILE")) == "--save-spectra FILE"
    assert Remedy("data", "DIR").python() == "data='DIR'"


def test_hints_without_a_remedy_are_printed_as_written() -> None:
    error = UsageError("bad", hint="use {braces} freely")
    assert error.remedy is None
    assert error.one_line() == error.one_line(flag_for) == "bad Hint: use {braces} freely"


def test_a_rule_that_needs_images_names_the_data_argument() -> None:
    from auditor.tasks.audit import _rules

    try:
        _rules(["min_separation_deg<5"], with_data=False)
    except UsageError as error:
        assert error.remedy == Remedy("data", "DIR")
        assert "--data" not in error.one_line() and "data='DIR'" in error.one_line()
        assert "pass --data DIR" in error.one_line(flag_for)
    else:
        raise AssertionError("a data rule without data was accepted")


def test_remedies_without_a_fixed_value_or_turning_a_flag_off() -> None:
    chosen = Remedy("arch", None)
    assert chosen.python() == "arch=..." and flag_for(chosen) == "--arch"
    off = Remedy("strict", False)
    assert off.python() == "strict=False" and flag_for(off) == "without --strict"


def test_library_errors_reach_the_command_line_with_flags(tmp_path, capsys) -> None:
    """A remedy raised deep in the library (select_samples) is spelled as the flag by the CLI."""
    from conftest import FIXTURES, run_cli

    code, out, err = run_cli(["extract", FIXTURES / "resnet8-digits.safetensors", "--data", FIXTURES / "digits",
                              "--per-class", "100000", "-o", tmp_path / "a.h5"], capsys)
    assert code == 2 and out == ""
    assert "Hint: lower --per-class" in err and "per_class=" not in err


def test_no_library_error_names_a_command_line_flag() -> None:
    """Messages and hints raised outside ``auditor/cli`` name arguments through a Remedy, never as ``--flags``."""
    import ast
    import re
    from pathlib import Path

    import auditor

    flag = re.compile(r"(?<![\w-])--[a-z]")
    root = Path(auditor.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if "cli" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            texts = [k.value for k in node.keywords if k.arg == "hint"]
            if name.endswith("Error") and node.args:
                texts.append(node.args[0])
            for text in texts:
                for part in ast.walk(text):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str) and flag.search(part.value):
                        offenders.append(f"{path.relative_to(root)}:{part.lineno}: {part.value!r}")
    assert offenders == []
