"""Reports people read and CI systems show (#24): tables at 80 and 160 columns, the verdict without rules,
JUnit XML, job summaries and the HTML page (rendered in headless Chromium where it is installed).

Everything renders the committed audit report (``tests/golden/audit.json``) once per module: no model runs.
"""

from __future__ import annotations

import base64
import html
import copy
import io
import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.table import Table

from auditor.report.audit_view import audit_markdown, audit_tables
from auditor.report.condition_view import condition_tables
from auditor.report.fit import fit_renderables, table_cells
from auditor.report.html import html_report
from auditor.report.junit import junit_report
from auditor.report.tables import inspect_tables
from auditor.report.verdict import evaluate, parse_rule
from conftest import run_cli

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def audit_doc() -> dict[str, Any]:
    return json.loads((GOLDEN / "audit.json").read_text())


@pytest.fixture(scope="module")
def no_rules_doc(audit_doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(audit_doc)
    doc["verdict"] = evaluate([], doc)
    return doc


@pytest.fixture(scope="module")
def failed_doc(audit_doc: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(audit_doc)
    rules = [parse_rule("max_kappa_linear_residual>1e3"), parse_rule("lemma1_upper_violations>0"),
             parse_rule("min_separation_deg<0")]
    doc["verdict"] = evaluate(rules, doc)
    return doc


def _views(doc: dict[str, Any]) -> dict[str, list[Any]]:
    inspect = json.loads((GOLDEN / "inspect.json").read_text())
    return {"audit": audit_tables(doc), "condition": condition_tables(doc), "inspect": inspect_tables(inspect)}


def _render(renderables: list[Any], width: int) -> str:
    stream = io.StringIO()
    console = Console(width=width, file=stream, color_system=None, legacy_windows=False)
    for renderable in fit_renderables(renderables):
        console.print(renderable)
    return stream.getvalue()


# -- 1. tables that fit the terminal


@pytest.mark.parametrize("width", [80, 160])
def test_every_table_fits_and_no_cell_is_cut(audit_doc: dict[str, Any], width: int) -> None:
    for name, renderables in _views(audit_doc).items():
        text = _render(renderables, width)
        assert "…" not in text, name
        assert max(len(line.rstrip()) for line in text.splitlines()) <= width, name
        tokens = set(re.findall(r"[^\s│┃]+", text))
        for table in (r for r in renderables if isinstance(r, Table)):
            for row in table_cells(table):
                for cell in row:
                    for word in str(getattr(cell, "plain", cell)).split():
                        assert word in tokens, f"{name} at {width}: {word!r} cut"
        if width == 160:
            assert "(continued)" not in text, name  # the width is used when there is more


def test_the_block_table_is_split_at_80_columns_and_whole_at_160(audit_doc: dict[str, Any]) -> None:
    narrow, wide = _render(audit_tables(audit_doc), 80), _render(audit_tables(audit_doc), 160)
    assert "Block conditioning (continued)" in narrow and "1.587e+06" in narrow and "3.027e+04" in narrow
    assert re.search(r"layer1\.0 .*1\.587e\+06 .*NO", wide)


def test_cli_table_follows_columns(tiny_checkpoint: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run_cli(["inspect", tiny_checkpoint], capsys)
    assert code == 0, err
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80 and "…" not in out
    assert "layer3.0.conv2" in out and "32x16x16" in out


# -- 5. the verdict without rules


def test_no_rules_says_so_with_findings_in_every_format(no_rules_doc: dict[str, Any]) -> None:
    verdict = no_rules_doc["verdict"]
    assert verdict["passed"] is True and verdict["note"] == "no rules given"
    assert verdict["findings"].startswith("3 of 3 residual blocks violate Lemma 1's lower bound")
    from auditor.report.document import validate

    validate(no_rules_doc)
    markdown = audit_markdown(no_rules_doc)
    assert markdown.startswith("## resdyn audit: no rules given\n") and "passed" not in markdown.splitlines()[0]
    assert "**Findings**: 3 of 3 residual blocks violate" in markdown
    table = _render(audit_tables(no_rules_doc), 160)
    assert "verdict: no rules given; findings: 3 of 3 residual blocks violate Lemma 1's lower bound" in table
    page = html_report(no_rules_doc, audit_tables(no_rules_doc))
    assert "verdict: no rules given" in page and "3 of 3 residual blocks violate" in page
    assert 'name="no rules given"' in junit_report(no_rules_doc)


# -- 3. JUnit XML

# The rules of the JUnit XML schema CI report tools read (Jenkins' junit-10.xsd, which GitLab and the
# GitHub test-report actions follow), checked here without a schema library:
_ALLOWED = {
    "testsuites": ({"name", "time", "tests", "failures", "disabled", "errors"}, set(), {"testsuite"}),
    "testsuite": ({"name", "tests", "failures", "errors", "time", "disabled", "skipped", "timestamp", "hostname",
                   "id", "package", "file", "log", "url", "version"}, {"name", "tests"},
                  {"properties", "testcase", "system-out", "system-err"}),
    "properties": (set(), set(), {"property"}),
    "property": ({"name", "value"}, {"name", "value"}, set()),
    "testcase": ({"name", "assertions", "time", "classname", "status"}, {"name"},
                 {"skipped", "error", "failure", "system-out", "system-err"}),
    "failure": ({"message", "type"}, set(), set()),
    "skipped": ({"message"}, set(), set()),
    "system-out": (set(), set(), set()),
}
_ORDER = {"testsuite": ["properties", "testcase", "system-out", "system-err"],
          "testcase": ["skipped", "error", "failure", "system-out", "system-err"]}


def _check_junit(element: ET.Element) -> None:
    allowed, required, children = _ALLOWED[element.tag]
    assert set(element.attrib) <= allowed and required <= set(element.attrib), element.tag
    for key in ("tests", "failures", "errors", "skipped", "disabled"):
        assert key not in element.attrib or element.attrib[key].isdigit()
    if "time" in element.attrib:
        float(element.attrib["time"])
    if "timestamp" in element.attrib:  # xs:dateTime without a time zone
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", element.attrib["timestamp"])
    tags = [child.tag for child in element]
    assert set(tags) <= children, element.tag
    if element.tag in _ORDER:
        ranks = [_ORDER[element.tag].index(tag) for tag in tags]
        assert ranks == sorted(ranks), f"{element.tag}: children out of order {tags}"
    if element.tag in ("testsuite", "properties"):
        assert tags.count("properties") <= 1
    for child in element:
        _check_junit(child)


def test_junit_rules_are_test_cases_and_lemma_checks_properties(failed_doc: dict[str, Any]) -> None:
    root = ET.fromstring(junit_report(failed_doc).encode())
    assert root.tag == "testsuites"
    _check_junit(root)
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "3" and suite.get("failures") == "2"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert set(cases) == {"max_kappa_linear_residual>1000", "lemma1_upper_violations>0", "min_separation_deg<0"}
    failure = cases["max_kappa_linear_residual>1000"].find("failure")
    assert failure is not None and "measured 1076" in failure.get("message", "")
    assert cases["lemma1_upper_violations>0"].find("failure") is None
    failure = cases["min_separation_deg<0"].find("failure")
    assert failure is not None and "measured -6.06" in failure.get("message", "")
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["lemma1_lower_holds[layer1.0]"] == "false"
    assert properties["lemma1_upper_holds[layer3.0]"] == "true"
    assert properties["arch"] == "resnet8"


def test_junit_without_rules_is_one_skipped_case(no_rules_doc: dict[str, Any]) -> None:
    root = ET.fromstring(junit_report(no_rules_doc).encode())
    _check_junit(root)
    suite = root.find("testsuite")
    assert suite is not None and (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("1", "0", "1")
    skipped = suite.find("testcase/skipped")
    assert skipped is not None and "3 of 3 residual blocks" in skipped.get("message", "")


# -- 4. job summaries


def test_step_summary_unset_is_one_line_before_any_work(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    code, out, err = run_cli(["audit", tmp_path, "--step-summary"], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "GITHUB_STEP_SUMMARY is not set" in err and "Hint:" in err


def test_step_summary_appends_and_shortens_below_the_limit(audit_doc: dict[str, Any], tmp_path: Path) -> None:
    from auditor.report.step_summary import SUMMARY_LIMIT, append_step_summary, shortened

    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    append_step_summary(summary, audit_markdown(audit_doc))
    text = summary.read_text()
    assert text.startswith("earlier step\n## resdyn audit: passed") and "Shortened" not in text
    huge = "| row |\n" * (SUMMARY_LIMIT // 8 + 10)
    summary.write_text("x" * 1000 + "\n")
    append_step_summary(summary, huge)
    assert summary.stat().st_size <= SUMMARY_LIMIT and summary.read_text().rstrip().endswith(
        "(`--format json|html -o FILE`).")
    assert shortened("a\nb\n", 100) == "a\nb\n"


# -- 2. the HTML page


def _png(width: int = 40, height: int = 30) -> bytes:
    from PIL import Image

    stream = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(stream, format="PNG")
    return stream.getvalue()


@pytest.fixture(scope="module")
def page(failed_doc: dict[str, Any], tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("html")
    figures = [folder / "conditioning.png", folder / "angles.png"]
    for figure in figures:
        figure.write_bytes(_png())
    path = folder / "audit.html"
    path.write_text(html_report(failed_doc, audit_tables(failed_doc), figures))
    return path


def test_html_is_self_contained_with_every_table(failed_doc: dict[str, Any], page: Path) -> None:
    text = page.read_text()
    assert "<script" not in text.lower() and not re.search(r"(src|href)=\"(https?:)?//", text)
    tables = [r for r in audit_tables(failed_doc) if isinstance(r, Table)]
    assert text.count("<table>") == len(tables) == 5
    for table in tables:
        assert f"<caption>{table.title}" in html.unescape(text)
    assert "verdict: FAILED" in text and "1.587e+06" in text and "min_separation_deg&lt;0" in text
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 2 and all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)


_CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                  if shutil.which(name)), None)

_PROBE = """<script>
addEventListener('load', () => {
  const images = [...document.images];
  document.body.setAttribute('data-probe', JSON.stringify({
    tables: document.querySelectorAll('table').length,
    rows: document.querySelectorAll('tbody tr').length,
    decoded: images.filter(i => i.complete && i.naturalWidth === 40 && i.naturalHeight === 30).length,
    images: images.length}));
});
</script>"""


@pytest.mark.skipif(_CHROMIUM is None, reason="no Chromium binary (chromium, chromium-browser or google-chrome) "
                    "on PATH; .ci/run installs Debian's chromium package")
def test_html_renders_in_headless_chromium(page: Path, tmp_path: Path) -> None:
    from PIL import Image

    probe = tmp_path / "probe.html"  # the page itself has no script: the test adds one to a copy
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    shot = tmp_path / "shot.png"
    common = [str(_CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              "--disable-dev-shm-usage", "--allow-file-access-from-files", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=60)
    match = re.search(r"data-probe=\"([^\"]+)\"", dom.stdout)
    assert match, dom.stderr[-2000:]
    found = json.loads(match.group(1).replace("&quot;", '"'))
    assert found == {"tables": 5, "rows": found["rows"], "decoded": 2, "images": 2} and found["rows"] >= 20
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                   capture_output=True, timeout=60, check=True)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 900)
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50  # text, table borders and the verdict's colour: not a blank page
    assert (255, 235, 233) in {colour for _, colour in colours}  # the failed verdict's box: the inline CSS applied


# -- 6. metrics, 9. manual pages, 11. archs, 12. a closed pipe


def test_metrics_one_line_each_in_help_and_command(capsys) -> None:
    from auditor.report.verdict import METRICS

    code, out, _ = run_cli(["metrics"], capsys)
    assert code == 0 and len(out.splitlines()) == len(METRICS)
    for line, (name, metric) in zip(out.splitlines(), METRICS.items()):
        assert line.startswith(name) and line.endswith(metric.help)
    code, out, _ = run_cli(["metrics", "--format", "json"], capsys)
    assert [entry["metric"] for entry in json.loads(out)] == list(METRICS)
    code, out, _ = run_cli(["audit", "--help"], capsys)
    assert "Metrics: see README" not in out
    for name, metric in METRICS.items():  # unwrapped: the name and its meaning on one line
        assert re.search(rf"^\s*{name}\s+{re.escape(metric.help)}$", out, re.MULTILINE), name


def test_man_pages_ship_with_the_program(capsys, tmp_path) -> None:
    code, out, _ = run_cli(["man", "audit"], capsys)
    assert code == 0 and out.startswith("RESDYN-AUDIT(1)") and "\\f" not in out and "\\-" not in out
    assert "EXIT STATUS" in out and "--step-summary" in out and "max_kappa_linear_residual" in out
    code, out, _ = run_cli(["man", "data", "--roff"], capsys)
    assert code == 0 and out.startswith(".TH RESDYN\\-DATA 1")
    code, out, err = run_cli(["man", "nosuch"], capsys)
    assert code == 2 and out == "" and "no manual page for 'nosuch'" in err and "audit" in err
    code, out, err = run_cli(["data", "--dir", tmp_path], capsys)  # a folder without sources
    assert code == 2 and out == "" and "'resdyn man data'" in err  # the hint cites what pip installs


def test_archs_groups_families_in_natural_order(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # every row on one line
    code, out, _ = run_cli(["archs"], capsys)
    assert code == 0 and "…" not in out
    text = " ".join(out.replace("│", " ").split())
    assert "resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110, resnet1202" in text
    assert "each also _nobn, _optb, _plain, _optb_nobn, _plain_nobn" in text
    assert "resnet110_nobn" not in out  # variants are named once per row, every name is in --format json


@pytest.mark.parametrize("args", [["metrics"], ["archs"]])
def test_a_closed_pipe_exits_0(args: list[str]) -> None:
    import sys

    child = subprocess.Popen([sys.executable, "-m", "auditor", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # the reader is gone before the first write (as `| head` after its lines)
    err = child.stderr.read()
    assert child.wait(timeout=60) == 0 and err == b""


# -- 7. a preset that drops the checkpoint's normalization


def test_a_preset_replacing_the_checkpoints_normalization_is_named(audit_doc: dict[str, Any]) -> None:
    from auditor.report.normalization import dropped_normalization

    doc = copy.deepcopy(audit_doc)
    doc["checkpoint"]["metadata"]["preprocessing"] = json.dumps({"size": 32, "mean": [0.3058] * 3, "std": [0.3237] * 3})
    doc["data"]["preprocessing"] = {"size": 32, "resize": None, "mean": [0.3058] * 3, "std": [0.3237] * 3}
    doc["data"]["preprocessing_source"] = {"mean": "checkpoint metadata", "std": "checkpoint metadata"}
    assert dropped_normalization(doc) is None
    doc["data"]["preprocessing"].update(mean=None, std=None)
    doc["data"]["preprocessing_source"] = {"mean": "preset none (data source 'digits')", "std": "same"}
    line = dropped_normalization(doc)
    assert line is not None and line.startswith("preset none (data source 'digits') replaces the normalization "
                                                "fixtures/resnet8-digits.safetensors was trained with (mean [0.3058")
    doc["data"]["preprocessing_source"] = {"mean": "option", "std": "option"}  # --mean/--std typed: a choice
    assert dropped_normalization(doc) is None


def test_the_note_under_the_stability_table_names_every_lower_bound():
    """Blocks whose worst gain or worst r did not meet the residual test are counted and named; none: one line."""
    from auditor.report.stability_view import worst_gain_note

    def block(name, gain_ok, r_ok):
        return {"name": name, "worst_gain": 2.0, "worst_gain_converged": gain_ok, "worst_r": 1.5, "worst_r_converged": r_ok}

    section = {"power_tolerance": 0.01, "blocks": [block("a", True, True), block("b", True, True)]}
    assert worst_gain_note(section) == "worst gain: converged (relative Lanczos residual <= 0.01) in all 2 blocks"
    section["blocks"] = [block("a", False, True), block("b", True, False), block("c", True, False)]
    note = worst_gain_note(section)
    assert note.startswith("worst gain: 1 of 3 blocks are lower bounds") and note.count(": a;") == 1
    assert note.endswith("worst r: 2 of 3 lower bounds ('>='; its sample's run did not meet the test): b, c")
    assert worst_gain_note({"blocks": [{"name": "a", "worst_gain_converged": None}]}) == ""  # not searched
