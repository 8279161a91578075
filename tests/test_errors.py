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


# --------------------------------------------------------------------------- outputs (#26, #24 item 8)


def test_output_refuses_devices_inputs_missing_folders_and_links(tmp_path, capsys) -> None:
    """-o writes a regular file or a new name in an existing folder, and nothing else."""
    import os
    import stat

    from conftest import FIXTURES, run_cli

    model = tmp_path / "m.safetensors"
    model.write_bytes((FIXTURES / "resnet8-digits.safetensors").read_bytes())
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("kept")
    (tmp_path / "link.json").symlink_to(elsewhere)
    cases = {
        "/dev/full": "it is not a regular file",
        model: "it is an input of this run",
        tmp_path / "missing" / "dir" / "r.json": "the folder",
        tmp_path / "link.json": "it is a symbolic link",
    }
    for target, reason in cases.items():
        code, out, err = run_cli(["inspect", model, "-f", "json", "-o", target], capsys)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"resdyn: error: {target}: cannot write ({reason}") and "Hint:" in err
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert model.read_bytes() == (FIXTURES / "resnet8-digits.safetensors").read_bytes()
    assert not (tmp_path / "missing").exists() and elsewhere.read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.json", "link.json", "m.safetensors"]


def test_outputs_take_the_umask_and_keep_the_mode_they_replace(tmp_path) -> None:
    import os
    import stat

    from auditor.report.document import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "new.json", "{}")
        write_atomic(tmp_path / "plots" / "a.png", b"png")  # plots: their folder is made
        assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o644
        assert stat.S_IMODE(os.stat(tmp_path / "plots" / "a.png").st_mode) == 0o644
        os.chmod(tmp_path / "new.json", 0o640)
        write_atomic(tmp_path / "new.json", "[]")
        assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o640
        assert (tmp_path / "new.json").read_text() == "[]"
        os.umask(0o077)
        write_atomic(tmp_path / "private.json", "{}")
        assert stat.S_IMODE(os.stat(tmp_path / "private.json").st_mode) == 0o600
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "plots", "private.json"]  # no temporary left


def test_store_lock_never_follows_a_planted_link(tmp_path) -> None:
    import pytest

    from auditor.io.store import StoreWriter
    from test_store import _header

    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out.h5.lock").symlink_to(outside / "created-through-the-link")
    with pytest.raises(StoreError, match="lock file is a symbolic link"):
        StoreWriter(tmp_path / "out.h5", _header())
    assert list(outside.iterdir()) == [] and not (tmp_path / "out.h5.partial").exists()


def test_scratch_is_removed_on_sigterm_and_after_a_kill(tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from auditor.io.scratch import PREFIX, remove_abandoned, scratch_folder

    # the signals' default dispositions in the child, whatever the test runner's (an ignored SIGINT or SIGTERM
    # is inherited across exec, and the scratch folder rightly leaves an ignored signal ignored)
    script = ("import signal, sys, time; from auditor.io.scratch import scratch_folder\n"
              "signal.signal(signal.SIGTERM, signal.SIG_DFL); signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "with scratch_folder(sys.argv[1]) as s:\n"
              "    (s / 'activations.h5.partial').write_bytes(b'x' * 1000); print(s, flush=True); time.sleep(60)\n")
    repo = Path(__file__).resolve().parents[1]
    for sig, code in ((signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, -signal.SIGINT), (signal.SIGKILL, -signal.SIGKILL)):
        child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                                 env=dict(os.environ, PYTHONPATH=str(repo)))
        folder = Path(child.stdout.readline().strip())
        assert folder.is_dir() and folder.name.startswith(PREFIX)
        child.send_signal(sig)
        assert child.wait(timeout=30) == code
        child.stdout.close()
        assert folder.exists() is (sig == signal.SIGKILL)  # a killed run cannot clean up ...
    with scratch_folder(tmp_path) as mine:  # ... the next one does, and keeps the folders of live runs
        assert [p.name for p in tmp_path.iterdir()] == [mine.name]
        assert remove_abandoned(tmp_path) == [] and mine.is_dir()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- bounds (#26 part 3)


def test_counts_beyond_memory_are_refused_before_any_work(capsys, monkeypatch, tmp_path) -> None:
    import pytest

    import auditor.tasks.bounds as bounds
    from auditor.tasks.stability import check_stability_options
    from conftest import FIXTURES, run_cli

    monkeypatch.setattr(bounds, "available_memory", lambda: 16 * 2**30)
    code, out, err = run_cli(["stability", FIXTURES / "resnet8-digits.safetensors", "--data", FIXTURES / "digits",
                              "--directions", 10**9, "--samples", 60], capsys)
    most = 10**9 - -(-(60 * 10**9 * 150 - 16 * 2**30) // (60 * 150))  # 150 bytes a run, 16 GiB free
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err == ("resdyn: error: 60 samples x 1000000000 directions need at least 8.2 TiB of memory, 16.0 GiB is "
                   f"available Hint: lower --directions {most} (the most that fits now)\n")
    monkeypatch.setattr(bounds, "available_memory", lambda: 10 * 2**20)
    with pytest.raises(UsageError, match="need at least 14.3 MiB of memory, 10.0 MiB is available") as info:
        check_stability_options(eps=1e-3, directions=1000, samples=100, dtype="float32")
    assert info.value.remedy == Remedy("directions", 1000 - -(-(15_000_000 - 10 * 2**20) // 15_000))
    check_stability_options(eps=1e-3, directions=10, samples=100, dtype="float32")  # 150 kB: fits
    code, out, err = run_cli(["extract", FIXTURES / "resnet8-digits.safetensors", "--data", FIXTURES / "digits",
                              "--batch-size", 256, "-o", tmp_path / "a.h5"], capsys)
    assert code == 2 and "batches of 256 images need at least" in err and "Hint: lower --batch-size" in err
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- #26 part 5: one line for malformed inputs


def test_malformed_configs_seeds_and_documents_are_one_line(tmp_path, capsys, monkeypatch) -> None:
    from pathlib import Path

    import pytest

    from auditor.io.config_file import resdyn_section
    from conftest import FIXTURES, run_cli

    cases = {
        "tool = 5\n": "'tool' must be a table, got int 5",
        '[tool]\nresdyn = "oops"\n': "'tool.resdyn' must be a table, got str 'oops'",
        "a = " + "[" * 50_000 + "]" * 50_000 + "\n": "not valid TOML (nested too deeply)",
    }
    for text, needle in cases.items():
        path = tmp_path / "pyproject.toml"
        path.write_text(text)
        with pytest.raises(UsageError, match=needle.replace("(", ".").replace(")", ".")):
            resdyn_section(path)
    monkeypatch.chdir(tmp_path)
    for std, needle in (("[0.0, 1.0, 1.0]", "std must be three positive numbers"), ("[nan, 1.0, 1.0]", "three finite")):
        Path("resdyn.toml").write_text(f'[data.d]\npath = "{FIXTURES / "digits"}"\nmean = [0, 0, 0]\nstd = {std}\n')
        code, out, err = run_cli(["data"], capsys)  # resdyn data refuses what extract refuses
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    Path("resdyn.toml").unlink()
    for seed in (-1, 2**70):
        code, out, err = run_cli(["extract", FIXTURES / "resnet8-digits.safetensors", "--data", FIXTURES / "digits",
                                  "--seed", seed, "-o", tmp_path / "s.h5"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "seed must be a non-negative integer" in err
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("[" * 50_000 + "]" * 50_000)
    from auditor.models.huggingface import load_json
    from auditor.errors import CheckpointError

    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_json(folder / "config.json")


def test_preprocessor_config_with_strings_for_numbers_is_one_line() -> None:
    import json

    import pytest

    from auditor.io.images import resolve_preprocessing
    from auditor.models.huggingface import hf_preprocessing

    found = hf_preprocessing({"image_mean": ["a", "b", "c"], "image_std": [1, 1, 1], "size": {"shortest_edge": 32}})
    with pytest.raises(UsageError, match=r"mean must be 3 numbers \(R, G, B\), got \['a', 'b', 'c'\]"):
        resolve_preprocessing(checkpoint_metadata={"preprocessing": json.dumps(found)})


def test_no_output_replaces_a_checkpoint_or_store_the_process_read(tmp_path) -> None:
    """--save-spectra, plots and -o alike: files read as inputs are remembered (device, inode, size, mtime)."""
    import pytest

    from auditor.errors import OutputError
    from auditor.io.checkpoint import read_checkpoint
    from auditor.report.document import write_atomic
    from conftest import FIXTURES

    model = tmp_path / "m.safetensors"
    original = (FIXTURES / "resnet8-digits.safetensors").read_bytes()
    model.write_bytes(original)
    read_checkpoint(model)
    with pytest.raises(OutputError, match="it is an input of this run"):
        write_atomic(model, b"spectra")
    assert model.read_bytes() == original and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
