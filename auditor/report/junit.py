"""JUnit XML of a report, for the test-report views of CI systems.

Every ``--fail-on`` rule is a test case (a failed rule is a ``<failure>`` whose
message holds the measured value); a report without rules has one skipped case,
``no rules given``, whose message is the findings line. The checks the paper's
claims get (Lemma 1 per block) and the checkpoint are ``<property>`` elements of
the suite. Everything is read from the command's JSON document; nothing is
recomputed. The layout follows the JUnit XML schema that Jenkins, GitLab and the
GitHub test-report actions read (``junit-10.xsd``): ``testsuites`` > ``testsuite``
(``name``, ``tests``, ``failures``, ``errors``, ``skipped``, ``time``,
``timestamp``, ``hostname``, ``id``, ``package``) > ``properties``, ``testcase``
(``name``, ``classname``, ``time``) with ``failure`` or ``skipped``, ``system-out``.
"""

from __future__ import annotations

import datetime
import socket
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .audit_view import measured_text
from .verdict import NO_RULES, verdict_headline

__all__ = ["junit_report", "lemma_properties", "write_junit"]

_LEMMA_CHECKS = ("lemma1_lower_holds", "lemma1_upper_holds")


def lemma_properties(document: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(name, value)`` per block and Lemma 1 check: ``lemma1_lower_holds[layer1.0]`` -> ``false``."""
    found = []
    for block in document.get("blocks") or []:
        for check in _LEMMA_CHECKS:
            if check in block:
                value = block[check]
                found.append((f"{check}[{block['name']}]", "unknown" if value is None else str(value).lower()))
    return found


def _properties(document: Mapping[str, Any], findings: str) -> list[tuple[str, str]]:
    checkpoint = document.get("checkpoint") or {}
    tool = document.get("tool") or {}
    found = [("tool", f"{tool.get('name', 'resdyn')} {tool.get('version', '')}".strip())]
    found += [(key, str(checkpoint[key])) for key in ("path", "sha256", "arch") if checkpoint.get(key) is not None]
    found.append(("findings", findings))
    return found + lemma_properties(document)


def junit_report(document: Mapping[str, Any]) -> str:
    """The report as a JUnit XML document (a ``testsuites`` root holding one ``testsuite``)."""
    command = document.get("command", "report")
    subject = (document.get("checkpoint") or {}).get("path", "")
    suite_name = f"resdyn {command}" + (f" {subject}" if subject else "")
    status, findings = verdict_headline(document)
    rules = (document.get("verdict") or {}).get("rules") or []
    failures = sum(1 for rule in rules if not rule["passed"])
    skipped = 0 if rules else 1
    tests = len(rules) or 1
    counts = {"tests": str(tests), "failures": str(failures), "errors": "0", "time": "0"}
    root = ET.Element("testsuites", name=f"resdyn {command}", **counts)
    stamp = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0, tzinfo=None).isoformat()
    suite = ET.SubElement(root, "testsuite", name=suite_name, **counts, skipped=str(skipped), timestamp=stamp,
                          hostname=socket.gethostname() or "localhost", id="0", package=f"resdyn.{command}")
    properties = ET.SubElement(suite, "properties")
    for name, value in _properties(document, findings):
        ET.SubElement(properties, "property", name=name, value=value)
    classname = f"resdyn.{command}.rules"
    for rule in rules:
        case = ET.SubElement(suite, "testcase", name=rule["rule"], classname=classname, time="0")
        measured = measured_text(rule)
        if not rule["passed"]:
            failure = ET.SubElement(case, "failure", type="rule",
                                    message=f"{rule['rule']} holds: measured {measured}")
            failure.text = f"metric {rule['metric']} = {measured}; the rule fails the run when its comparison holds"
        else:
            ET.SubElement(case, "system-out").text = f"measured {measured}"
    if not rules:
        case = ET.SubElement(suite, "testcase", name=NO_RULES, classname=classname, time="0")
        ET.SubElement(case, "skipped", message=f"{NO_RULES}; findings: {findings}")
    ET.SubElement(suite, "system-out").text = f"verdict: {status}; findings: {findings}"
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(document: Mapping[str, Any], path: Path) -> None:
    """Write the JUnit XML of ``document`` to ``path`` atomically (the report's inputs are never replaced).

    Raises
    ------
    OutputError
        ``path`` cannot be written, or would replace the report's checkpoint.
    """
    from ..io.safe_output import safe_output

    text = junit_report(document)
    with safe_output(path, [str(document.get("checkpoint", {}).get("path", ""))]) as temporary:
        temporary.write_bytes(text.encode())
