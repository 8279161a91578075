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
