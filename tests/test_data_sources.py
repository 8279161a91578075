"""Named data sources: [data.NAME] in resdyn.toml, [tool.resdyn.data.NAME] in pyproject.toml, `resdyn data`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from auditor.errors import DataError, UsageError
from auditor.io.data_sources import load_data_sources, resolve_data_source
from auditor.io.store import open_store

from conftest import FIXTURES, run_cli, run_json

DIGITS = FIXTURES / "digits"
CHECKPOINT = FIXTURES / "resnet8-digits.safetensors"


def _project(tmp_path: Path, text: str, name: str = "resdyn.toml") -> Path:
    """A project folder with the digits under data/ and a config file declaring sources."""
    (tmp_path / "data").mkdir()
    os.symlink(DIGITS, tmp_path / "data" / "digits")
    (tmp_path / name).write_text(text)
    return tmp_path


def test_sources_resolve_relative_to_their_file(tmp_path) -> None:
    _project(tmp_path, '[data.small]\npath = "data/digits"\nclasses = ["3", "1"]\nper-class = 4\nseed = 7\n'
                       'preset = "cifar10"\nsize = 32\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n')
    sources, file = load_data_sources(tmp_path)
    assert file == tmp_path.resolve() / "resdyn.toml"
    small = sources["small"]
    assert small.path == tmp_path.resolve() / "data" / "digits"
    assert small.options == {"classes": ["3", "1"], "per_class": 4, "seed": 7, "preset": "cifar10", "size": 32,
                             "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    assert resolve_data_source(str(DIGITS), tmp_path) is None  # an existing path is never a name


def test_pyproject_tool_table(tmp_path) -> None:
    _project(tmp_path, '[project]\nname = "x"\n[tool.resdyn.data.d]\npath = "data/digits"\n', "pyproject.toml")
    sources, file = load_data_sources(tmp_path)
    assert file.name == "pyproject.toml" and list(sources) == ["d"]


@pytest.mark.parametrize("text,needle", [
    ('[data.a]\npath = "x"\nper_class = 3\n', "unknown key(s) per_class"),
    ('[data.a]\nclasses = ["1"]\n', "has no 'path'"),
    ('[data.a]\npath = "x"\nper-class = 0\n', "per-class must be an integer >= 1"),
    ('[data.a]\npath = "x"\nmean = [1, 2]\n', "mean must be three numbers"),
    ('[data.a]\npath = "x"\npreset = "coco"\n', "preset must be one of"),
    ('[data.a\npath = "x"\n', "not valid TOML"),
])
def test_bad_config_is_one_usage_error(tmp_path, text, needle) -> None:
    (tmp_path / "resdyn.toml").write_text(text)
    with pytest.raises(UsageError) as caught:
        load_data_sources(tmp_path)
    assert needle in caught.value.one_line()
    assert "\n" not in caught.value.one_line()


def test_unknown_name_lists_the_known_ones(tmp_path) -> None:
    _project(tmp_path, '[data.beta]\npath = "data/digits"\n[data.alpha]\npath = "data/digits"\n')
    with pytest.raises(DataError) as caught:
        resolve_data_source("gamma", tmp_path)
    assert "known sources in" in caught.value.one_line() and "alpha, beta" in caught.value.one_line()


def test_stability_with_a_named_source_equals_the_folder(tmp_path, capsys, monkeypatch) -> None:
    _project(tmp_path, '[data.digits-small]\npath = "data/digits"\nclasses = ["0", "5", "7"]\nper-class = 6\n')
    monkeypatch.chdir(tmp_path)
    common = ["--samples", "6", "--directions", "2", "--power-iterations", "2", "--no-progress"]
    named = run_json(["stability", CHECKPOINT, "--data", "digits-small", *common], capsys)
    direct = run_json(["stability", CHECKPOINT, "--data", DIGITS, "--classes", "0,5,7", "--per-class", "6",
                       *common], capsys)
    assert named["data"]["source"] == {"name": "digits-small", "file": str(tmp_path.resolve() / "resdyn.toml")}
    assert "source" not in direct["data"]
    for key in ("classes", "samples_per_class", "preset", "preprocessing", "input_shape"):
        assert named["data"][key] == direct["data"][key]
    assert named["stability"] == direct["stability"]
    # a flag given on the command line overrides the source's key
    fewer = run_json(["stability", CHECKPOINT, "--data", "digits-small", "--per-class", "2", *common], capsys)
    assert fewer["data"]["samples_per_class"] == {"0": 2, "5": 2, "7": 2}


def test_unknown_source_name_on_the_command_line(tmp_path, capsys, monkeypatch) -> None:
    _project(tmp_path, '[data.digits]\npath = "data/digits"\n')
    monkeypatch.chdir(tmp_path)
    out_file = tmp_path / "acts.h5"
    code, out, err = run_cli(["extract", CHECKPOINT, "--data", "digitz", "-o", out_file], capsys)
    assert code == 2 and out == "" and not out_file.exists()
    assert len(err.strip().splitlines()) == 1 and "known sources in" in err and "digits" in err


def test_data_command_lists_what_each_source_resolves_to(tmp_path, capsys, monkeypatch) -> None:
    _project(tmp_path, '[data.all]\npath = "data/digits"\n[data.two]\npath = "data/digits"\nclasses = ["1", "2"]\n'
                       'per-class = 5\n')
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["data", "--format", "json"], capsys)
    assert code == 0, err
    document = json.loads(out)
    expected = {d.name: len([f for f in d.iterdir() if f.suffix == ".png"]) for d in DIGITS.iterdir() if d.is_dir()}
    by_name = {entry["name"]: entry for entry in document["sources"]}
    assert by_name["all"]["images_per_class"] == dict(sorted(expected.items()))
    assert by_name["all"]["images"] == sum(expected.values())
    assert by_name["two"]["classes"] == ["1", "2"] and by_name["two"]["per_class"] == 5
    assert all(entry["ok"] for entry in document["sources"])
    code, out, _ = run_cli(["data"], capsys)
    assert code == 0 and "two" in out


def test_data_command_fails_on_a_broken_source(tmp_path, capsys, monkeypatch) -> None:
    _project(tmp_path, '[data.ok]\npath = "data/digits"\n[data.gone]\npath = "nowhere"\n'
                       '[data.greedy]\npath = "data/digits"\nper-class = 1000\n')
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["data", "--format", "json"], capsys)
    assert code == 2
    document = json.loads(out)
    states = {entry["name"]: entry["ok"] for entry in document["sources"]}
    assert states == {"ok": True, "gone": False, "greedy": False}
    assert len(err.strip().splitlines()) == 1 and "'gone'" in err


def test_data_command_without_config(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["data"], capsys)
    assert code == 2 and out == "" and "no data sources" in err


def test_source_seed_chooses_the_images_as_the_seed_option_does(tmp_path, monkeypatch) -> None:
    from auditor.tasks.images import open_images
    from auditor.subject import open_subject

    _project(tmp_path, '[data.s]\npath = "data/digits"\nper-class = 3\nseed = 11\n')
    monkeypatch.chdir(tmp_path)
    subject = open_subject(CHECKPOINT)
    named = open_images("s", subject)
    direct = open_images(DIGITS, subject, per_class=3, seed=11)
    other = open_images(DIGITS, subject, per_class=3, seed=0)
    assert named.dataset.samples == direct.dataset.samples != other.dataset.samples
    assert named.dataset.root == direct.dataset.root


def test_a_seed_given_overrides_the_source_seed_zero_included(tmp_path, capsys, monkeypatch) -> None:
    from auditor.subject import open_subject
    from auditor.tasks.images import open_images

    _project(tmp_path, '[data.s]\npath = "data/digits"\nper-class = 3\nseed = 11\n')
    monkeypatch.chdir(tmp_path)
    subject = open_subject(CHECKPOINT)
    zero = open_images(DIGITS, subject, per_class=3, seed=0)
    assert open_images("s", subject, seed=0).dataset.samples == zero.dataset.samples
    assert open_images("s", subject).dataset.samples != zero.dataset.samples
    for args, seed in ((["--seed", "0"], 0), ([], 11)):  # the command line: a flag given wins, 0 included
        out_file = tmp_path / f"x{len(args)}.h5"
        code, _, err = run_cli(["extract", CHECKPOINT, "--data", "s", *args, "-o", out_file, "--no-progress"], capsys)
        assert code == 0, err
        with open_store(out_file) as store:
            assert store.attrs["seed"] == seed
