"""``--fail-on`` rules: parse ``METRIC OP NUMBER``, evaluate against a report.

A rule *fails* when its comparison holds (``max_kappa_linear_residual>1e4``
fails when some block's exact condition number exceeds 1e4). A singular block's
condition number is +inf (null in JSON, named in the entry's ``infinite`` map,
see :mod:`auditor.report.nonfinite`): rules compare it as +inf, so ``>1e4``
fails and ``<1e4`` holds. A metric whose value is unknown (extremes that did
not converge, a section that did not run) cannot be shown to be safe, so its
rule fails too, with the reason.
"""

from __future__ import annotations

import math
import operator
import re
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .nonfinite import INFINITE, Measured, aggregate

__all__ = ["Rule", "METRICS", "NO_RULES", "parse_rule", "measure", "evaluate", "findings", "verdict_headline", "rules_from_config"]

NO_RULES = "no rules given"

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_RULE = re.compile(r"^\s*([a-z0-9_]+)\s*(>=|<=|==|!=|>|<)\s*([-+0-9.eE]+|inf|-inf)\s*$")


@dataclass(frozen=True)
class Rule:
    """One parsed rule."""

    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def holds(self, value: float) -> bool:
        """True when ``value OP threshold`` (the rule *fails* the audit when it holds)."""
        return _OPERATORS[self.op](value, self.threshold)


@dataclass(frozen=True)
class _Metric:
    section: str
    help: str
    compute: Callable[[Mapping[str, Any]], float | Measured | None]

    def measure(self, doc: Mapping[str, Any]) -> Measured:
        """The metric on ``doc``: a number (``inf`` for a singular block's kappa), or None and why."""
        if not doc.get(self.section):
            return Measured(None, f"section '{self.section}' did not run")
        value = self.compute(doc)
        return value if isinstance(value, Measured) else Measured(None if value is None else float(value))


def _agg(section: str, key: str, how: Callable[[list[float]], float]) -> Callable[[Mapping[str, Any]], Measured]:
    def compute(doc: Mapping[str, Any]) -> Measured:
        entries = doc.get(section) or []
        if isinstance(entries, Mapping):
            entries = entries.get("blocks", [])
        if key.endswith("_residual"):  # plain blocks have no residual kappa by definition
            entries = [e for e in entries if e.get("shortcut") != "none"]
        if not entries:
            return Measured(None)
        return aggregate(entries, key, how)  # a singular block: inf; an unknown value: not provably safe

    return compute


def _count(section: str, key: str, bad: Any) -> Callable[[Mapping[str, Any]], float | None]:
    def compute(doc: Mapping[str, Any]) -> float | None:
        entries = doc.get(section) or []
        return float(sum(1 for e in entries if e.get(key) is bad))

    return compute


def _stage_agg(key: str, how: Callable[[list[float]], float]) -> Callable[[Mapping[str, Any]], float | None]:
    def compute(doc: Mapping[str, Any]) -> float | None:
        values = [s.get(key) for s in doc.get("stages") or [] if "intra" in s]
        if not values or any(v is None for v in values):
            return None
        return float(how([float(v) for v in values]))

    return compute


def _last_stage(key: str) -> Callable[[Mapping[str, Any]], float | None]:
    def compute(doc: Mapping[str, Any]) -> float | None:
        stages = [s for s in doc.get("stages") or [] if "intra" in s]
        return None if not stages else stages[-1].get(key)

    return compute


def _trajectory_final(doc: Mapping[str, Any]) -> float | None:
    trajectory = (doc.get("stability") or {}).get("trajectory") or {}
    return (trajectory.get("logits") or {}).get("median")


def _flips(doc: Mapping[str, Any]) -> float | None:
    trajectory = (doc.get("stability") or {}).get("trajectory") or {}
    value = trajectory.get("flips")
    return None if value is None else float(value)


_median = statistics.median

METRICS: dict[str, _Metric] = {
    "max_kappa_linear_residual": _Metric("blocks", "largest exact condition number of a linearized residual block", _agg("blocks", "kappa_linear_residual", max)),
    "median_kappa_linear_residual": _Metric("blocks", "median exact condition number over blocks", _agg("blocks", "kappa_linear_residual", _median)),
    "max_kappa_linear_plain": _Metric("blocks", "largest exact condition number of a block without its shortcut", _agg("blocks", "kappa_linear_plain", max)),
    "max_kappa_paper_residual": _Metric("blocks", "largest (prod M + 1)/(prod m + 1), the paper's Eq. 2", _agg("blocks", "kappa_paper_residual", max)),
    "max_kappa_paper_plain": _Metric("blocks", "largest prod M / prod m", _agg("blocks", "kappa_paper_plain", max)),
    "lemma1_lower_violations": _Metric("blocks", "blocks whose smallest singular value is below prod m + 1", _count("blocks", "lemma1_lower_holds", False)),
    "lemma1_upper_violations": _Metric("blocks", "blocks whose largest singular value exceeds prod M + 1", _count("blocks", "lemma1_upper_holds", False)),
    "max_sigma": _Metric("layers", "largest singular value of any conv or linear layer", _agg("layers", "sigma_max", max)),
    "min_sigma": _Metric("layers", "smallest singular value of any conv or linear layer", _agg("layers", "sigma_min", min)),
    "max_amplification": _Metric("stability", "largest measured perturbation amplification r of a block", _agg("stability", "r_max", max)),
    "median_amplification": _Metric("stability", "median over blocks of the median amplification r", _agg("stability", "r_median", _median)),
    "max_worst_gain": _Metric("stability", "largest local gain of a block (Lanczos on its Jacobian)", _agg("stability", "worst_gain", max)),
    "end_to_end_error": _Metric("stability", "median relative error of the logits for a relative input perturbation eps", _trajectory_final),
    "prediction_flips": _Metric("stability", "samples whose predicted class changed under the input perturbation", _flips),
    "min_separation_deg": _Metric("stages", "smallest (min inter - max intra) angle over stages, degrees", _stage_agg("separation", min)),
    "final_separation_deg": _Metric("stages", "separation at the last stage, degrees", _last_stage("separation")),
}


def parse_rule(text: str) -> Rule:
    """Parse ``METRIC OP NUMBER``; unknown metrics and malformed rules are usage errors."""
    match = _RULE.match(text)
    if not match:
        raise UsageError(
            f"malformed rule {text!r}",
            hint="write METRIC OP NUMBER, e.g. 'max_kappa_linear_residual>1e4' (ops: > >= < <= == !=)",
        )
    metric, op, number = match.groups()
    if metric not in METRICS:
        raise UsageError(
            f"unknown metric {metric!r} in rule {text!r}",
            hint="known metrics: " + ", ".join(sorted(METRICS)),
        )
    try:
        threshold = float(number)
    except ValueError:
        raise UsageError(f"rule {text!r}: {number!r} is not a number") from None
    return Rule(metric, op, threshold)


def measure(metric: str, document: Mapping[str, Any]) -> Measured:
    """One metric of a report: a number (``inf`` where a block is singular), or None and why."""
    return METRICS[metric].measure(document)


def findings(document: Mapping[str, Any]) -> str:
    """One line of what the report found, whatever the rules: Lemma 1, singular blocks, flips, separation.

    Read from the document's own numbers (``summary``, ``blocks``, ``stability``,
    ``stages``), so a report written before this line existed shows it too.
    """
    parts = []
    blocks = [b for b in document.get("blocks") or [] if "lemma1_lower_holds" in b]
    if blocks:
        residual = [b for b in blocks if b.get("shortcut") != "none"] or blocks
        lower = sum(1 for b in residual if b.get("lemma1_lower_holds") is False)
        parts.append(f"{lower} of {len(residual)} residual blocks violate Lemma 1's lower bound")
        upper = sum(1 for b in residual if b.get("lemma1_upper_holds") is False)
        if upper:
            parts.append(f"{upper} of {len(residual)} violate its upper bound")
        singular = (document.get("summary") or {}).get("singular_block_names") or []
        if singular:
            parts.append(f"{len(singular)} singular (kappa infinite)")
    trajectory = (document.get("stability") or {}).get("trajectory") or {}
    if trajectory.get("runs"):
        parts.append(f"predicted class changed in {trajectory.get('flips', 0)} of {trajectory['runs']} perturbed runs")
    stages = [s for s in document.get("stages") or [] if s.get("separation") is not None]
    if stages:
        parts.append(f"classes separate at {sum(1 for s in stages if s['separation'] > 0)} of {len(stages)} stages "
                     f"(final separation {stages[-1]['separation']:.2f} degrees)")
    return "; ".join(parts) if parts else "no findings (no section that checks a claim ran)"


def verdict_headline(document: Mapping[str, Any]) -> tuple[str, str]:
    """``(status, findings)``: ``passed``, ``FAILED`` or ``no rules given``, and the findings line."""
    verdict = document.get("verdict") or {}
    line = verdict.get("findings") or findings(document)
    if not verdict.get("rules"):
        return NO_RULES, line
    return ("passed" if verdict.get("passed", True) else "FAILED"), line


def evaluate(rules: Iterable[Rule], document: Mapping[str, Any]) -> dict[str, Any]:
    """The ``verdict`` section: every rule with its measured value and pass/fail, and the findings line.

    An infinite value (a singular block's kappa) is compared as such and written
    ``"value": null`` with ``"infinite": {"value": "inf"}`` and the reason.
    Without rules the verdict passes and says so (``"note": "no rules given"``).
    """
    results = []
    for rule in rules:
        metric = METRICS[rule.metric]
        value, why = metric.measure(document)
        if value is None or math.isnan(value):
            reason = why or "value undefined (a singular operator or no valid samples)"
            if "separation" in rule.metric:  # the stages say why (e.g. one class only)
                reason = next((s["separation_reason"] for s in document.get("stages") or []
                               if s.get("separation_reason")), reason)
            results.append({"rule": str(rule), "metric": rule.metric, "value": None, "passed": False, "reason": reason})
            continue
        failed = rule.holds(value)
        result = {"rule": str(rule), "metric": rule.metric, "value": value, "passed": not failed}
        if math.isinf(value):
            result.update(value=None, **{INFINITE: {"value": "inf" if value > 0 else "-inf"}}, reason=why or "infinite")
        results.append(result)
    verdict: dict[str, Any] = {"passed": all(r["passed"] for r in results), "rules": results,
                               "findings": findings(document)}
    if not results:
        verdict["note"] = NO_RULES
    return verdict


def rules_from_config(path: Path | None, start: Path | None = None) -> tuple[list[str], Path | None]:
    """``fail-on`` rules from ``resdyn.toml`` or ``[tool.resdyn]`` in ``pyproject.toml``.

    With ``path`` given it must exist; otherwise the current directory is
    searched (``resdyn.toml`` first).
    """
    from ..io.config_file import CONFIG_FILES, resdyn_section

    candidates = [path] if path else [(start or Path.cwd()) / name for name in CONFIG_FILES]
    for candidate in candidates:
        if candidate is None or not candidate.is_file():
            if path is not None:
                raise UsageError(f"config file {str(path)!r} does not exist")
            continue
        section = resdyn_section(candidate)
        if section is None:
            continue
        rules = section.get("fail-on", section.get("fail_on", []))
        if isinstance(rules, str):
            rules = [rules]
        if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
            raise UsageError(f"{candidate}: 'fail-on' must be a list of rule strings")
        return list(rules), candidate
    return [], None
