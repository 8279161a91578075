"""The same commands under ``torchrun``: work split across processes, one result.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR`` in
the environment) the command line calls :func:`init` once: a ``torch.distributed``
process group (gloo for the Python objects the ranks exchange, NCCL alongside it
when the machine has a GPU per local rank), ``cuda:LOCAL_RANK`` as each rank's CUDA
device, and ``cores / local world size`` torch threads per rank. The tasks then
split their units of work (layers, blocks, checkpoints, batches of images) with
:func:`split`, compute their own with :func:`compute`, and every rank gets the
results of all, in the single-process order: each unit is computed as one process
computes it, only the wall time changes (float64 products that round by thread
count round as in one process with the rank's thread count; see :func:`init`).

Failures. A unit that raises on one rank is caught there and travels with the
results: every rank then raises :class:`RankError` ("rank 1: <cause>"), so no
rank waits in a collective for a peer that gave up. A rank that dies outright
is seen by its peers as a failed collective (:class:`RankError` too) or, at
worst, after the collective timeout (``RESDYN_DIST_TIMEOUT`` seconds, default
600), and torchrun ends the others.

Without ``torchrun`` nothing here runs: :func:`world` is one rank, :func:`compute`
is a plain loop, torch is not imported (:mod:`torch.distributed` is loaded by
:func:`init` only).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Iterator, TypeVar

from .errors import AuditorError, Remedy

__all__ = [
    "World",
    "RankError",
    "launched",
    "init",
    "shutdown",
    "world",
    "split",
    "compute",
    "compute_shares",
    "on_main",
    "everyone",
    "agree",
    "TIMEOUT_ENV",
    "LEDGER_ENV",
    "THREADS_ENV",
]

T = TypeVar("T")
TIMEOUT_ENV = "RESDYN_DIST_TIMEOUT"
THREADS_ENV = "RESDYN_RANK_THREADS"
_DEFAULT_TIMEOUT_S = 600.0
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
_LOST_HINT = (f"another rank ended or hangs: see torchrun's report of the ranks; {TIMEOUT_ENV} sets how many "
              "seconds a rank waits for the others")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run.

    Attributes
    ----------
    rank : int
        0 .. size - 1; rank 0 writes every output.
    size : int
        Processes in the run (1: a plain single-process run).
    local_rank : int
        Index on this machine (the CUDA device it uses).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this rank writes the outputs (rank 0)."""
        return self.rank == 0


class RankError(AuditorError):
    """A rank failed (an input error, an internal error, or a lost peer).

    Raised on every rank alike, so that all end together; :attr:`rank` is the
    one that failed, and the message starts with it.
    """

    def __init__(self, rank: int, message: str, *, hint: str | None = None, remedy: Remedy | None = None) -> None:
        super().__init__(f"rank {rank}: {message}", hint=hint, remedy=remedy)
        self.rank = rank


_SINGLE = World()
_current: World = _SINGLE
_local_depth = 0  # > 0 inside a unit of compute(): nested tasks run single-process
LEDGER_ENV = "RESDYN_DIST_LEDGER"
# Under torchrun, one entry per split phase: what this rank did and how long it
# worked and waited; written to $RESDYN_DIST_LEDGER/rank<N>.json by shutdown()
# when set (bench/bench_distributed.py reads it).
_ledger: list[dict[str, Any]] = []


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (its environment variables are set)."""
    return all(os.environ.get(name) for name in _LAUNCH_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


def world() -> World:
    """The current world: the process group's after :func:`init`, else (and inside a unit) one rank."""
    return _SINGLE if _local_depth else _current


def _timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return _DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        from .errors import UsageError

        raise UsageError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    return value


def _rank_threads(local_size: int) -> int:
    """Torch threads per rank: ``RESDYN_RANK_THREADS``, else the cores shared among the machine's ranks."""
    raw = os.environ.get(THREADS_ENV)
    if raw is None:
        return max(1, _cores() // max(1, local_size))
    if not raw.isdigit() or int(raw) < 1:
        from .errors import UsageError

        raise UsageError(f"{THREADS_ENV}={raw!r} is not a positive number of threads")
    return int(raw)


def _cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def _all_cores() -> Iterator[None]:
    """Within: torch uses every core (rank 0 working alone while the others wait).

    Also what a single process uses, and float64 GEMMs round differently with
    another thread count, so rank 0's numbers equal the single process's.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def init() -> World:
    """Join the ``torchrun`` process group (idempotent); one rank when not launched.

    Uses gloo for the Python objects exchanged (CPU tensors), with NCCL for CUDA
    tensors when the machine has a GPU per local rank (``cuda:LOCAL_RANK`` becomes
    the current device, so ``--device cuda`` means it), a collective timeout of
    ``RESDYN_DIST_TIMEOUT`` seconds, and ``cores / LOCAL_WORLD_SIZE`` torch threads
    per rank. ``RESDYN_RANK_THREADS`` overrides the latter: some float64 products
    (MKL GEMMs, the spectra's chunking) round by thread count, in one process too, so
    ranks with the single process's thread count reproduce its last digits.

    Returns
    -------
    World
    """
    global _current
    if _current.size > 1 or not launched():
        return _current
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    timeout = timedelta(seconds=_timeout_seconds())
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    torch.set_num_threads(_rank_threads(local_size))
    backend = "gloo"
    # NCCL needs a GPU of its own per rank; every rank of a machine decides alike
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_size:
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout, rank=rank, world_size=size)
    _current = World(rank=rank, size=size, local_rank=local_rank)
    return _current


def shutdown(*, together: bool = True) -> None:
    """Leave the process group (if :func:`init` joined one).

    Parameters
    ----------
    together : bool
        Every rank is leaving now (after :func:`agree`): wait for all first. False
        when this rank leaves on its own (an exception): a barrier would pair with
        another collective of the others.
    """
    global _current
    if _current.size > 1:
        import torch.distributed as dist

        folder = os.environ.get(LEDGER_ENV)
        if folder:
            import json
            from pathlib import Path

            with contextlib.suppress(OSError):
                Path(folder, f"rank{_current.rank}.json").write_text(json.dumps(
                    {"rank": _current.rank, "size": _current.size, "phases": _ledger}, indent=1))

        if dist.is_initialized():
            # every rank past its last collective before any closes its connections
            # (a peer that tears down first can abort the other's gloo threads)
            if together:
                with contextlib.suppress(Exception):
                    dist.barrier()
            dist.destroy_process_group()
    _current = _SINGLE


def split(costs: Sequence[float], size: int) -> list[list[int]]:
    """Assign units to ``size`` ranks, balancing their estimated costs (deterministic).

    Longest-processing-time first: units by decreasing cost (ties by index), each
    to the rank with the least work so far (ties by rank). Each rank's list is
    in increasing unit order.

    Parameters
    ----------
    costs : sequence of float
        Estimated cost of each unit (any common scale).
    size : int
        Ranks (>= 1).

    Returns
    -------
    list of list of int
        ``shares[r]``: the unit indices of rank ``r``.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    shares: list[list[int]] = [[] for _ in range(size)]
    load = [0.0] * size
    for unit in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        target = min(range(size), key=lambda r: (load[r], r))
        shares[target].append(unit)
        load[target] += float(costs[unit])
    return [sorted(share) for share in shares]


@contextlib.contextmanager
def _local() -> Iterator[None]:
    """Within: :func:`world` is one rank (a unit's own tasks do not split again)."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def _failure(exc: BaseException) -> dict[str, Any]:
    """What another rank needs to raise this rank's error as :class:`RankError`."""
    if os.environ.get("RESDYN_DEBUG"):
        traceback.print_exc(file=sys.__stderr__)
    if isinstance(exc, RankError):
        return {"rank": exc.rank, "message": exc.message.split(": ", 1)[1], "hint": exc.hint, "remedy": exc.remedy}
    if isinstance(exc, AuditorError):
        return {"rank": _current.rank, "message": exc.message, "hint": exc.hint, "remedy": exc.remedy}
    return {"rank": _current.rank, "message": f"internal error: {type(exc).__name__}: {exc}",
            "hint": "set RESDYN_DEBUG=1 for the traceback", "remedy": None}


def _raise_first(statuses: Sequence[dict[str, Any] | None]) -> None:
    failed = [s for s in statuses if s is not None]
    if failed:
        first = min(failed, key=lambda s: s["rank"])
        raise RankError(first["rank"], first["message"], hint=first["hint"], remedy=first["remedy"])


def _all_gather(value: Any) -> list[Any]:
    """``all_gather_object``, a failed collective (a peer died, the timeout) as :class:`RankError`."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * _current.size
    try:
        dist.all_gather_object(gathered, value)
    except Exception as exc:  # gloo / NCCL report a lost peer or a timeout as RuntimeError subclasses
        raise RankError(_current.rank, f"lost contact with the other ranks ({' '.join(str(exc).split())[:200]})",
                        hint=_LOST_HINT) from exc
    return gathered


def _gather_to_main(value: Any) -> list[Any] | None:
    """``gather_object`` to rank 0 (``None`` elsewhere); failures as in :func:`_all_gather`."""
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * _current.size if _current.is_main else None
    try:
        dist.gather_object(value, gathered, dst=0)
    except Exception as exc:
        raise RankError(_current.rank, f"lost contact with the other ranks ({' '.join(str(exc).split())[:200]})",
                        hint=_LOST_HINT) from exc
    return gathered


def _run_units(indices: list[int], work: Callable[[int], T], costs: Sequence[float] | None,
               progress: Callable[[int, int], None] | None, threads: int) -> list[T]:
    """``[work(i) for i in indices]`` in order, on ``threads`` worker threads (largest cost first)."""
    if threads <= 1 or len(indices) <= 1:
        done = []
        for unit in indices:
            done.append(work(unit))
            if progress is not None:
                progress(len(done), len(indices))
        return done
    from concurrent.futures import ThreadPoolExecutor, as_completed

    order = sorted(indices, key=lambda i: -float(costs[i])) if costs is not None else indices
    results: dict[int, T] = {}
    with ThreadPoolExecutor(min(threads, len(indices))) as pool:
        futures = {pool.submit(work, unit): unit for unit in order}
        for count, future in enumerate(as_completed(futures), 1):
            results[futures[future]] = future.result()
            if progress is not None:
                progress(count, len(indices))
    return [results[i] for i in indices]


def compute(
    units: int,
    work: Callable[[int], T],
    *,
    costs: Sequence[float] | None = None,
    to_main: bool = False,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 1,
) -> list[T]:
    """``[work(i) for i in range(units)]``, the units split across the ranks.

    Parameters
    ----------
    units : int
    work : callable
        ``work(i)``: the result of unit ``i``; the same on any rank (it runs with
        :func:`world` as one rank, so the tasks it calls do not split again).
        Results travel pickled.
    costs : sequence of float, optional
        Estimated cost per unit (see :func:`split`); default equal.
    to_main : bool
        Gather the results on rank 0 only (other ranks get ``[]``), for results
        that only rank 0 writes.
    progress : callable, optional
        ``progress(done, total)`` over this rank's own units.
    threads : int
        Worker threads per rank: for work that spends its time in code that
        releases the GIL (LAPACK, BLAS, torch), set up by the caller to run one
        thread each. The largest ``costs`` start first.

    Returns
    -------
    list
        The results of every unit in unit order (on every rank, or rank 0 only).

    Raises
    ------
    RankError
        On every rank, when any rank failed (the lowest failing rank is named).
    """
    here = world()
    if here.size == 1:
        return _run_units(list(range(units)), work, costs, progress, threads)

    def share(indices: list[int]) -> list[T]:
        return _run_units(indices, work, costs, progress, threads)

    share.__qualname__ = getattr(work, "__qualname__", "work")  # the ledger's phase name
    return compute_shares(units, share, costs=costs, to_main=to_main)


def compute_shares(
    units: int,
    work: Callable[[list[int]], list[T]],
    *,
    costs: Sequence[float] | None = None,
    to_main: bool = False,
) -> list[T]:
    """As :func:`compute`, with one call per rank: ``work(indices)`` returns their results, in order.

    For work that shares a setup between units (one model copy, one forward pass).
    Single-process: ``work(list(range(units)))``.
    """
    here = world()
    if here.size == 1:
        return work(list(range(units)))
    weights = [float(c) for c in costs] if costs is not None else [1.0] * units
    shares = split(weights, here.size)
    mine = shares[here.rank]
    status: dict[str, Any] | None = None
    local: list[T] = []
    started = time.perf_counter()
    try:
        with _local():
            local = list(work(mine)) if mine else []
        if len(local) != len(mine):
            raise RuntimeError(f"work returned {len(local)} results for {len(mine)} units")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        status, local = _failure(exc), []
    worked = time.perf_counter() - started
    _ledger.append({"phase": getattr(work, "__qualname__", "work"), "units": units, "mine": len(mine),
                    "cost_share": sum(weights[i] for i in mine) / (sum(weights) or 1.0), "work_s": worked})
    gathered = _gather_to_main((status, local)) if to_main else _all_gather((status, local))
    if to_main:  # rank 0 knows; the others learn of a failure from a broadcast of it
        statuses = [s for s, _ in gathered] if gathered is not None else None
        _raise_first(_all_gather(statuses if here.is_main else None)[0])
    else:
        _raise_first([s for s, _ in gathered])
    _ledger[-1]["wait_s"] = time.perf_counter() - started - worked
    if gathered is None:
        return []
    results: list[Any] = [None] * units
    for indices, (_, values) in zip(shares, gathered):
        for unit, value in zip(indices, values):
            results[unit] = value
    return results


def everyone(work: Callable[[], T]) -> list[T]:
    """``work()`` on every rank; every rank's result, in rank order, on every rank.

    For work that every rank does on its own share and that the ranks then combine
    (a stage's Gram tiles). Single-process: ``[work()]``.

    Raises
    ------
    RankError
        On every rank, when ``work`` failed on any (the lowest failing rank is named).
    """
    here = world()
    if here.size == 1:
        return [work()]
    started = time.perf_counter()
    status, value = _attempt(work)
    worked = time.perf_counter() - started
    gathered = _all_gather((status, value))
    _raise_first([s for s, _ in gathered])
    _ledger.append({"phase": getattr(work, "__qualname__", "work"), "units": here.size, "mine": 1,
                    "cost_share": 1.0 / here.size, "work_s": worked, "wait_s": time.perf_counter() - started - worked})
    return [v for _, v in gathered]


def _attempt(work: Callable[[], T]) -> tuple[dict[str, Any] | None, T | None]:
    """``(None, work())``, or ``(status, None)`` when it failed (an interrupt or exit passes through)."""
    try:
        return None, work()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        return _failure(exc), None


def on_main(work: Callable[[], T]) -> T:
    """``work()`` on rank 0 only, its result (or failure) given to every rank.

    Rank 0 runs it with every core of its machine (the other ranks wait), as a
    single process would. Single-process: ``work()``.

    Raises
    ------
    RankError
        On every rank, when ``work`` failed on rank 0.
    """
    here = world()
    if here.size == 1:
        return work()
    status: dict[str, Any] | None = None
    value: Any = None
    started = time.perf_counter()
    if here.is_main:
        with _local(), _all_cores():
            status, value = _attempt(work)
    worked = time.perf_counter() - started
    status, value = _all_gather((status, value))[0]
    _raise_first([status])
    _ledger.append({"phase": getattr(work, "__qualname__", "work"), "units": 1, "mine": int(here.is_main),
                    "cost_share": float(here.is_main), "work_s": worked,
                    "wait_s": time.perf_counter() - started - worked, "main_only": True})
    return value


def agree(code: int, failure: tuple[int, str] | None) -> tuple[int, tuple[int, str] | None]:
    """The exit code of the whole run, and the failure to print, from every rank's own.

    Parameters
    ----------
    code : int
        This rank's exit code.
    failure : (int, str) or None
        ``(rank that failed, one-line message)`` when this rank ended with an error.

    Returns
    -------
    code : int
        2 (error) when any rank failed, else 130 when any was interrupted, else rank 0's.
    failure : (int, str) or None
        The failure of the lowest failing rank.
    """
    if world().size == 1:
        return code, failure
    try:
        everyone = _all_gather((code, failure))
    except RankError as exc:
        return 2, failure or (exc.rank, exc.one_line())
    failures = [f for _, f in everyone if f is not None]
    codes = [c for c, _ in everyone]
    if failures or 2 in codes:
        return 2, min(failures) if failures else None
    if 130 in codes:
        return 130, None
    return codes[0], None
