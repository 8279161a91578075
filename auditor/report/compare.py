"""Compare two JSON reports: every metric side by side, and rules on the change."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import InputError
from .document import READABLE_VERSIONS
from .nonfinite import INFINITE, Measured, entry_value, put
from .verdict import METRICS, Rule

__all__ = ["load_report", "compare_reports", "evaluate_changes", "compare_document"]


def load_report(path: Path) -> dict[str, Any]:
    """Read a resdyn JSON report, refusing anything else with a one-line reason."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a JSON document ({exc})", hint="pass JSON reports written by resdyn") from None
    tool = document.get("tool") if isinstance(document, dict) else None
    if not isinstance(tool, dict) or tool.get("name") != "resdyn":
        raise InputError(f"{path}: not a resdyn report", hint="pass JSON reports written by resdyn")
    version = str(document.get("schema_version", ""))
    if version.split(".")[0] not in READABLE_VERSIONS:
        raise InputError(f"{path}: schema_version {version!r} is not supported "
                         f"(this resdyn reads {', '.join(READABLE_VERSIONS)})")
    _check_finite(path, document)
    _check_schema(path, document)
    return document


def _non_finite(value: Any, where: tuple[str, ...] = ()) -> tuple[tuple[str, ...], float] | None:
    """The path and value of the first NaN or +-Infinity in a parsed document, depth first."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found = _non_finite(child, (*where, str(key)))
        if found is not None:
            return found
    return None


def _check_finite(path: Path, document: dict[str, Any]) -> None:
    """Refuse NaN / Infinity (Python's json reads them; resdyn never writes them), naming the key."""
    found = _non_finite(document)
    if found is not None:
        where, value = found
        raise InputError(f"{path}: {'/'.join(where)} is {value!r}, which resdyn never writes (a missing value is "
                         "null with a reason)", hint="pass JSON reports written by resdyn, unedited")


def _check_schema(path: Path, document: dict[str, Any]) -> None:
    """Refuse a document that claims to be a report but does not match the schema, naming the field."""
    import jsonschema

    from .document import schema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema()).iter_errors(document))
    if error is None:
        return
    where = "/".join(str(part) for part in error.absolute_path) or "top level"
    message = " ".join(error.message.split())
    if len(message) > 120:
        message = message[:117] + "..."
    raise InputError(f"{path}: not a valid resdyn report (at {where}: {message})",
                     hint="pass JSON reports written by resdyn, unedited")


def _value(metric: str, document: Mapping[str, Any]) -> Measured:
    return METRICS[metric].measure(document)


def _difference(a: Measured, b: Measured) -> Measured:
    """``b - a`` with infinities: finite to inf is +inf, inf to finite -inf, inf to inf undefined."""
    if a.value is None or b.value is None:
        side, missing = ("A", a) if a.value is None else ("B", b)
        return Measured(None, f"{side} has no value ({missing.reason or 'not measured'})")
    if a.infinite and b.infinite and a.value == b.value:
        return Measured(None, "infinite in both reports: the change is undefined")
    return Measured(b.value - a.value, "A is infinite" if a.infinite else "B is infinite" if b.infinite else None)


def _sides(a: Measured, b: Measured, change: Measured | None = None) -> dict[str, Any]:
    """``a``, ``b`` (and ``change``) the JSON way: numbers, or null with ``*_reason`` and the ``infinite`` map."""
    out: dict[str, Any] = {}
    for key, measured in (("a", a), ("b", b), ("change", change)):
        if measured is not None:
            put(out, key, measured)
    if INFINITE in out:
        out[INFINITE] = out.pop(INFINITE)
    return out


def compare_reports(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics of both reports and their change, plus matching blocks and stages.

    A singular block's kappa is +inf on its side and in the change (null in JSON,
    named in the entry's ``infinite`` map, see :mod:`auditor.report.nonfinite`),
    shown ``inf``; a metric is left out only when neither report measured its section.
    """
    metrics = []
    for name in METRICS:
        section = METRICS[name].section
        if not a.get(section) and not b.get(section):
            continue
        va, vb = _value(name, a), _value(name, b)
        if va.value is None and vb.value is None and va.reason is None and vb.reason is None:
            continue
        metrics.append({"metric": name, **_sides(va, vb, _difference(va, vb)), "help": METRICS[name].help})
    blocks_a = {x["name"]: x for x in a.get("blocks") or []}
    blocks = [
        {"name": x["name"], **_sides(entry_value(blocks_a[x["name"]], "kappa_linear_residual"),
                                     entry_value(x, "kappa_linear_residual"))}
        for x in b.get("blocks") or [] if x["name"] in blocks_a
    ]
    stages_a = {s["name"]: s for s in a.get("stages") or [] if "separation" in s}
    stages = [
        {"name": s["name"], "a": stages_a[s["name"]].get("separation"), "b": s.get("separation")}
        for s in b.get("stages") or [] if s["name"] in stages_a and "separation" in s
    ]
    return {"metrics": metrics, "blocks": blocks, "stages": stages}


def evaluate_changes(rules: Iterable[Rule], comparison: Mapping[str, Any]) -> dict[str, Any]:
    """Rules on the change B - A: ``max_kappa_linear_residual>0`` fails when it grew (to inf included)."""
    by_metric = {m["metric"]: m for m in comparison["metrics"]}
    results = []
    for rule in rules:
        entry = by_metric.get(rule.metric, {})
        change = entry_value(entry, "change") if entry else Measured(None)
        if change.value is None:
            reason = entry.get("change_reason") or "metric missing from one of the reports"
            results.append({"rule": str(rule), "metric": rule.metric, "value": None, "passed": False,
                            "reason": reason})
            continue
        failed = rule.holds(change.value)
        result = {"rule": str(rule), "metric": rule.metric, "value": change.value, "passed": not failed}
        if change.infinite:
            result.update(value=None, reason=change.reason or "infinite",
                          **{INFINITE: {"value": entry[INFINITE]["change"]}})
        results.append(result)
    return {"passed": all(r["passed"] for r in results), "rules": results}


def compare_document(path_a: Path, path_b: Path, rules: Iterable[Rule] = ()) -> dict[str, Any]:
    """The ``compare`` report of two JSON reports: both sides, the comparison and, with rules, the verdict.

    Parameters
    ----------
    path_a, path_b : Path
        Reports written by resdyn (JSON).
    rules : iterable of Rule
        Rules on the change ``B - A`` (see :func:`auditor.report.verdict.parse_rule`).

    Raises
    ------
    InputError
        A file that is not a resdyn report (see :func:`load_report`).
    """
    from .document import report_header

    rules = list(rules)
    a, b = load_report(path_a), load_report(path_b)
    comparison = compare_reports(a, b)

    def side(path: Path, doc: Mapping[str, Any]) -> dict[str, Any]:
        checkpoint = doc.get("checkpoint", {})
        return {"path": str(path), "arch": checkpoint.get("arch"), "sha256": checkpoint.get("sha256")}

    document = {**report_header("compare"), "a": side(path_a, a), "b": side(path_b, b), "comparison": comparison}
    if rules:
        document["verdict"] = evaluate_changes(rules, comparison)
    return document
