"""Fault injection for the test suite only (tests/test_faults.py), read in this one place.

``RESDYN_TEST_FAULT="kill:ROWS:PHASE"`` SIGKILLs the process the first time a batch reaches ROWS stored
rows, at PHASE of :meth:`~auditor.io.store.StoreWriter.append`; ``"delay:SECONDS"`` sleeps after every
batch (a slow writer). Unset, the hook does nothing.
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["FAULT_PHASES", "FaultHook"]

_FAULT_ENV = "RESDYN_TEST_FAULT"
FAULT_PHASES = ("written", "data-flushed", "counted", "flushed")


def _test_fault() -> tuple[str, float, str] | None:
    spec = os.environ.get(_FAULT_ENV)
    if not spec:
        return None
    kind, _, rest = spec.partition(":")
    if kind == "delay":
        return "delay", float(rest), "flushed"
    rows, _, phase = rest.partition(":")
    if kind != "kill" or phase not in FAULT_PHASES:
        raise ValueError(f"{_FAULT_ENV}={spec!r}: expected kill:ROWS:PHASE (PHASE one of "
                         f"{', '.join(FAULT_PHASES)}) or delay:SECONDS")
    return "kill", int(rows), phase


class FaultHook:
    """The test suite's kill hook, read from the environment once (a writer makes one when it opens).

    Raises
    ------
    ValueError
        ``RESDYN_TEST_FAULT`` is set to something it cannot read.
    """

    def __init__(self) -> None:
        self._fault = _test_fault()

    def at(self, phase: str, rows: int) -> None:
        """The writer reached ``phase`` with ``rows`` stored rows: kill or sleep if asked; nothing otherwise."""
        if self._fault is None or self._fault[2] != phase:
            return
        kind, value, _ = self._fault
        if kind == "delay":
            time.sleep(value)
        elif rows >= value:
            os.kill(os.getpid(), signal.SIGKILL)
