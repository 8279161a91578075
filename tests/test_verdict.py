"""--fail-on rules: parsing, evaluation, config files."""

from __future__ import annotations

from pathlib import Path

import pytest

from auditor.errors import UsageError
from auditor.report.verdict import METRICS, evaluate, parse_rule, rules_from_config

DOC = {
    "blocks": [
        {"name": "a", "kappa_linear_residual": 3.0, "kappa_paper_residual": 2.0, "lemma1_lower_holds": False, "lemma1_upper_holds": True},
        {"name": "b", "kappa_linear_residual": 50.0, "kappa_paper_residual": 4.0, "lemma1_lower_holds": True, "lemma1_upper_holds": True},
        {"name": "c", "kappa_linear_residual": 7.0, "kappa_paper_residual": 3.0, "lemma1_lower_holds": False, "lemma1_upper_holds": True},
    ],
    "stages": [
        {"name": "stem", "intra": {}, "separation": -4.0},
        {"name": "layer1", "intra": {}, "separation": 6.5},
    ],
    "stability": {"eps": 1e-3, "blocks": [{"name": "a", "r_max": 2.0, "r_median": 1.0}, {"name": "b", "r_max": 12.0, "r_median": 0.5}],
                  "trajectory": {"logits": {"median": 0.02}, "flips": 3}},
}


@pytest.mark.parametrize(
    "rule, value, passed",
    [
        ("max_kappa_linear_residual>1e4", 50.0, True),
        ("max_kappa_linear_residual>10", 50.0, False),
        ("median_kappa_linear_residual>=7", 7.0, False),
        ("lemma1_lower_violations>0", 2.0, False),
        ("lemma1_upper_violations>0", 0.0, True),
        ("min_separation_deg<5", -4.0, False),
        ("final_separation_deg<5", 6.5, True),
        ("max_amplification>10", 12.0, False),
        ("median_amplification<0.6", 0.75, True),
        ("end_to_end_error>0.1", 0.02, True),
        ("prediction_flips>=3", 3.0, False),
    ],
)
def test_rules_measure_and_decide(rule: str, value: float, passed: bool) -> None:
    result = evaluate([parse_rule(rule)], DOC)
    assert result["rules"][0]["value"] == pytest.approx(value)
    assert result["rules"][0]["passed"] is passed
    assert result["passed"] is passed


def test_missing_value_fails_with_reason() -> None:
    doc = {"blocks": [{"name": "a", "kappa_linear_residual": None,
                       "kappa_linear_residual_reason": "the residual operator's extreme singular values did not converge"}]}
    result = evaluate([parse_rule("max_kappa_linear_residual>1e4")], doc)
    assert result["passed"] is False and "a: the residual operator's" in result["rules"][0]["reason"]
    assert "did not converge" in result["rules"][0]["reason"] and result["rules"][0]["value"] is None
    result = evaluate([parse_rule("max_kappa_linear_residual<1e4")], doc)  # unknown: fails either way
    assert result["passed"] is False
    result = evaluate([parse_rule("max_amplification>1")], doc)
    assert "did not run" in result["rules"][0]["reason"]


@pytest.mark.parametrize("text", ["kappa>3", "max_kappa_linear_residual", "max_kappa_linear_residual>>3", "max_sigma>abc", ""])
def test_malformed_or_unknown_rules_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_rule(text)


def test_every_metric_is_documented() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "ci.md").read_text()
    for name, metric in METRICS.items():
        assert metric.help
        assert f"`{name}`" in docs, f"docs/ci.md does not document metric {name}"


def test_rules_from_config_files(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.resdyn]\nfail-on = ["max_sigma>10"]\n')
    assert rules_from_config(None, tmp_path)[0] == ["max_sigma>10"]
    (tmp_path / "resdyn.toml").write_text('fail-on = ["lemma1_lower_violations>0"]\n')
    assert rules_from_config(None, tmp_path)[0] == ["lemma1_lower_violations>0"]
    bad = tmp_path / "bad.toml"
    bad.write_text("fail-on = [1, 2]\n")
    with pytest.raises(UsageError, match="list of rule strings"):
        rules_from_config(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("fail-on = [\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        rules_from_config(broken)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert rules_from_config(None, empty) == ([], None)
