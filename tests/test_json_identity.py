"""The JSON of every command, byte for byte the same as the committed golden reports (#25).

Each command that writes a JSON report runs once, in-process, on the bundled example
(``fixtures/``: the digits ResNet-8, its per-epoch runs, the digits folder and a named data
source) and on one trained CIFAR-10 checkpoint of ``../shared/data`` (``condition``; skipped when that
folder is absent), with the small sizes a user would pick for a quick look. The report is normalized (the
temporary folder, the project and shared-data roots become ``<tmp>``, ``<root>``, ``<shared>``;
the tool's version becomes ``<version>``) and compared with ``tests/golden/identity/NAME.json``:
every key, every string, every float exactly. The reports carry no timestamps or durations, and
every computation here is seeded and single-process, so two runs on one machine agree to the
last bit (checked when the files were written); a refactor that moves code between layers must
leave them alone.

After an intended change of a report, regenerate and review the diff::

    RESDYN_UPDATE_GOLDEN=1 python -m pytest tests/test_json_identity.py
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CHECKPOINTS, FIXTURES, ROOT, SHARED, needs_shared

GOLDEN = Path(__file__).parent / "golden" / "identity"
UPDATE = os.environ.get("RESDYN_UPDATE_GOLDEN") == "1"

CKPT = FIXTURES / "resnet8-digits.safetensors"
DIGITS = FIXTURES / "digits"
EPOCHS = FIXTURES / "checkpoints"
CIFAR_CKPT = CHECKPOINTS / "cifar10-resnet20-akamaster.th"
QUICK = ["--samples", "2", "--directions", "2", "--power-iterations", "2"]
SOURCE = '[data.digits-small]\npath = "digits"\nclasses = ["0", "5", "7"]\nper-class = 3\n'

pytestmark = pytest.mark.skipif(not CKPT.exists(), reason="fixtures not built (python fixtures/build.py)")


class Workspace:
    """A temporary folder where the commands run once each; later cases read earlier outputs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.project = root / "project"  # a resdyn.toml naming the digits, for --data NAME and `data`
        self.project.mkdir()
        os.symlink(DIGITS, self.project / "digits")
        (self.project / "resdyn.toml").write_text(SOURCE)
        self.store = root / "acts.h5"
        self._documents: dict[str, dict[str, Any]] = {}

    def extract(self) -> Path:
        """The digits' activation store, written once by ``resdyn extract``."""
        if not self.store.exists():
            assert _run(["extract", CKPT, "--data", DIGITS, "--per-class", "3", "-o", self.store, "--no-progress"]) == 0
        return self.store

    def report(self, name: str) -> dict[str, Any]:
        """Run case ``name`` once (with -o into the workspace) and return its JSON document."""
        if name not in self._documents:
            from auditor.report.document import validate

            args, cwd = CASES[name](self)
            target = self.root / f"{name}.json"
            with _working_directory(cwd or ROOT):
                code = _run([*args, "--format", "json", "-o", target])
            assert code == 0, f"resdyn {name} exited {code}"
            document = json.loads(target.read_text())
            validate(document)
            self._documents[name] = document
        return self._documents[name]


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    """contextlib.chdir of Python 3.11, for 3.10."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _run(args: list[Any]) -> int:
    from auditor.cli import run

    return run([str(a) for a in args])


def _compare(w: Workspace) -> tuple[list[Any], None]:
    """The two condition reports (folded and raw BatchNorm), written first."""
    w.report("condition")
    w.report("condition-no-fold")
    return ["compare", w.root / "condition.json", w.root / "condition-no-fold.json"], None


Case = Callable[[Workspace], tuple[list[Any], Path | None]]

CASES: dict[str, Case] = {
    "inspect": lambda w: (["inspect", CKPT], None),
    "condition": lambda w: (["condition", CKPT], None),
    "condition-no-fold": lambda w: (["condition", CKPT, "--no-fold-bn"], None),
    "compare": lambda w: _compare(w),
    # a named source from ./resdyn.toml: classes 0, 5, 7, three images each
    "stability": lambda w: (["stability", CKPT, "--data", "digits-small", *QUICK], w.project),
    "angles": lambda w: (["angles", w.extract()], None),
    "verify": lambda w: (["verify", w.extract()], None),
    "angles-models": lambda w: (["angles", EPOCHS / "resnet8" / "epoch-06.safetensors",
                                 EPOCHS / "resnet8_nobn" / "epoch-06.safetensors", "--data", DIGITS,
                                 "--per-class", "2", "--stages", "stem,layer3"], None),
    "audit": lambda w: (["audit", CKPT, "--data", DIGITS, "--per-class", "2", *QUICK], None),
    "trajectory": lambda w: (["trajectory", EPOCHS / "resnet8" / "epoch-00.safetensors",
                              EPOCHS / "resnet8" / "epoch-06.safetensors", "--data", DIGITS, "--per-class", "2",
                              "--stages", "stem,layer3", "--condition"], None),
    "data": lambda w: (["data", "--dir", w.project], None),
    # the trained ResNet-20 (a torch.save dict, 'module.' keys, option-A shortcuts); its stability and
    # angles take several seconds each on 2 cores, so the images' path is checked on the example above
    "cifar-condition": lambda w: (["condition", CIFAR_CKPT], None),
}
SHARED_CASES = {"cifar-condition"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("identity"))


def normalize(value: Any, roots: list[tuple[str, str]]) -> Any:
    """The report with run-specific strings replaced: folder prefixes and the tool's version."""
    if isinstance(value, dict):
        return {key: ("<version>" if key == "version" and isinstance(item, str) and value.get("name") == "resdyn"
                      else normalize(item, roots)) for key, item in value.items()}
    if isinstance(value, list):
        return [normalize(item, roots) for item in value]
    if isinstance(value, str):
        for prefix, token in roots:
            value = value.replace(prefix, token)
    return value


def _roots(workspace: Workspace) -> list[tuple[str, str]]:
    pairs = {}
    for path, token in ((workspace.root, "<tmp>"), (SHARED, "<shared>"), (ROOT, "<root>")):
        pairs[str(path)] = token
        pairs[str(path.resolve())] = token
    return sorted(pairs.items(), key=lambda pair: -len(pair[0]))  # the longest prefix first


def first_difference(got: Any, expected: Any, where: str = "$") -> str | None:
    """The JSON path of the first place where two documents differ (None when equal)."""
    if type(got) is not type(expected):
        return f"{where}: {got!r} != {expected!r}"
    if isinstance(got, dict):
        if list(got) != list(expected):
            return f"{where}: keys {list(got)} != {list(expected)}"
        for key in got:
            found = first_difference(got[key], expected[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(got, list):
        if len(got) != len(expected):
            return f"{where}: {len(got)} items != {len(expected)}"
        for index, (a, b) in enumerate(zip(got, expected)):
            found = first_difference(a, b, f"{where}[{index}]")
            if found:
                return found
        return None
    return None if got == expected else f"{where}: {got!r} != {expected!r}"


def test_first_difference_names_the_path() -> None:
    """The comparison can fail: a float one ulp off, a renamed key, a missing item."""
    doc = {"a": [1.0, {"b": 0.1 + 0.2}], "c": "x"}
    assert first_difference(doc, json.loads(json.dumps(doc))) is None
    assert first_difference(doc, {"a": [1.0, {"b": 0.3}], "c": "x"}) == "$.a[1].b: 0.30000000000000004 != 0.3"
    assert first_difference(doc, {"a": [1.0], "c": "x"}) == "$.a: 2 items != 1"
    assert first_difference(doc, {"a": doc["a"], "d": "x"}).startswith("$: keys")
    roots = [("/tmp/w", "<tmp>")]
    assert normalize({"tool": {"name": "resdyn", "version": "9"}, "p": "/tmp/w/x.h5"}, roots) == {
        "tool": {"name": "resdyn", "version": "<version>"}, "p": "<tmp>/x.h5"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=needs_shared) if name in SHARED_CASES else name
                                  for name in CASES])
def test_report_is_identical_to_the_golden_json(name: str, workspace: Workspace) -> None:
    document = normalize(workspace.report(name), _roots(workspace))
    expected = GOLDEN / f"{name}.json"
    if UPDATE:
        expected.parent.mkdir(parents=True, exist_ok=True)
        expected.write_text(json.dumps(document, indent=1) + "\n")
    assert expected.exists(), f"{expected} missing: run with RESDYN_UPDATE_GOLDEN=1 to write it"
    found = first_difference(document, json.loads(expected.read_text()))
    assert found is None, f"resdyn {name}'s JSON changed at {found}; if intended, regenerate (see the module docstring)"
