"""Process-wide settings (auditor/runtime.py)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each test starts Python processes that import torch


def _huge_pages_always() -> bool:
    """Transparent huge pages for every mapping: faults then count 2 MiB pages, too few to compare."""
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


linux_4k_pages = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _huge_pages_always(),
    reason="glibc malloc settings, counted in 4 KiB page faults",
)

# Each child: argv[1] the repository, argv[2] "on" to apply the setting ("twice":
# apply it, then call again, reporting both results); it prints {"applied",
# "again", "faults"} (minor page faults of its measured loop). The settings are
# process-wide, so they are tried in children, never in the pytest process.
_PREAMBLE = textwrap.dedent(
    """
    import json, resource, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from auditor.runtime import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[2] in ("on", "twice") else None
    again = keep_freed_memory() if sys.argv[2] == "twice" else None
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    """
)

# Forward passes of a CIFAR ResNet-20 (batch 32, 2 MiB activations).
_CHILD = textwrap.dedent(
    """
    torch.set_num_threads(1)
    from auditor.models.registry import build_model
    torch.manual_seed(0)
    model, _ = build_model("resnet20")
    model.eval()
    x = torch.randn(32, 3, 32, 32)
    with torch.inference_mode():
        for _ in range(3):  # warm up
            model(x)
        before = faults()
        for _ in range(10):  # a forward pass per batch, as extract and stability run them
            model(x)
    print(json.dumps({"applied": applied, "again": again, "faults": faults() - before}))
    """
)


# Blocks above glibc's largest mmap threshold (32 MiB), as a ResNet-50 at 224 px
# allocates them (100 MiB per activation at batch 32), while a long-lived
# buffer (extract's pool) sits in the heap.
_CHILD_LARGE = textwrap.dedent(
    """
    kept = torch.ones(4 * 2**20)  # 16 MiB, alive throughout
    for _ in range(20):  # warm up: the heap grows over the first few blocks
        activation = torch.ones(16 * 2**20)  # 64 MiB
        del activation
    before = faults()
    for _ in range(10):
        activation = torch.ones(16 * 2**20)
        del activation
    print(json.dumps({"applied": applied, "again": again, "faults": faults() - before}))
    """
)


# Worker threads (as the spectra's) allocating 16 MiB blocks, below glibc's 64 MiB
# per-thread heaps, after the main thread freed more than they need.
_CHILD_THREADS = textwrap.dedent(
    """
    import threading
    freed = torch.ones(32 * 2**20)  # 128 MiB on the main heap, then freed (the heap keeps it)
    del freed
    def work():
        blocks = [torch.ones(4 * 2**20) for _ in range(2)]  # 2 x 16 MiB at once
        del blocks
    before = faults()
    workers = [threading.Thread(target=work) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    print(json.dumps({"applied": applied, "again": again, "faults": faults() - before}))
    """
)


@functools.lru_cache(maxsize=None)
def _measured(mode: str, children: tuple[str, ...]) -> tuple[dict, ...]:
    """The children's loops one after another in one process per mode (each prints its own line):
    three Python processes that import torch instead of seven."""
    script = _PREAMBLE + "".join(children)
    done = subprocess.run([sys.executable, "-c", script, str(REPO), mode], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    return tuple(json.loads(line) for line in done.stdout.strip().splitlines()[-len(children):])


def _faults(mode: str, child: str = _CHILD) -> dict:
    children = (_CHILD_LARGE,) if mode == "twice" else (_CHILD, _CHILD_LARGE, _CHILD_THREADS)
    return _measured(mode, children)[children.index(child)]


@linux_4k_pages
def test_keep_freed_memory_stops_page_faults_between_batches() -> None:
    tuned = _faults("on")
    if not tuned["applied"]:
        pytest.skip("not glibc")
    default = _faults("off")
    # glibc's defaults give the activations back to the OS after each pass
    # (thousands of faults per batch); the tuned heap keeps them, so all ten
    # tuned batches fault fewer pages than one default batch does. (The tuned
    # count is a one-off of a few hundred pages that varies by machine: 512
    # here, 1024 on CI; an absolute bound on it measured the machine.)
    default_per_batch = default["faults"] / 10
    assert default_per_batch > 1000
    assert tuned["faults"] < default_per_batch


@linux_4k_pages
def test_keep_freed_memory_reuses_blocks_above_the_mmap_threshold() -> None:
    tuned = _faults("on", _CHILD_LARGE)
    if not tuned["applied"]:
        pytest.skip("not glibc")
    default = _faults("off", _CHILD_LARGE)
    # glibc maps every 64 MiB block afresh (16,384 faults each); the tuned
    # heap hands the same memory back every time
    assert default["faults"] > 10 * 16_000
    # ten blocks reused: fewer faults in all than one fresh block costs
    assert tuned["faults"] < 16_384


@linux_4k_pages
def test_keep_freed_memory_is_harmless_to_call_twice() -> None:
    """A second call (a library user after the console command) applies the same settings and keeps them."""
    twice = _faults("twice", _CHILD_LARGE)
    if not twice["applied"]:
        pytest.skip("not glibc")
    assert twice["again"] is True
    # still tuned after the second call: the ten 64 MiB blocks reuse one mapping
    assert twice["faults"] < 16_384


@linux_4k_pages
def test_keep_freed_memory_lets_worker_threads_reuse_the_main_heap() -> None:
    tuned = _faults("on", _CHILD_THREADS)
    if not tuned["applied"]:
        pytest.skip("not glibc")
    default = _faults("off", _CHILD_THREADS)
    # per-thread arenas: 64 MiB of fresh pages (16,384 faults); one arena: the freed heap
    assert default["faults"] > 12_000
    assert tuned["faults"] < 4_096
