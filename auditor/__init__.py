"""resdyn: audit trained ResNets as discrete dynamical systems.

The public API is re-exported here lazily, so ``import auditor`` stays cheap
(no torch, no matplotlib, no file system access until a name is used)::

    from auditor import audit
    report = audit("model.safetensors", data="images/")
    report.to_dict()
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ._version import __version__

__all__ = [
    "__version__",
    "audit",
    "load_checkpoint",
    "load_model",
    "analyze_anatomy",
    "open_subject",
    "condition",
    "median_angles",
    "measure_stability",
    "extract_activations",
    "open_store",
    "verify_store",
]

_LAZY = {
    "audit": "auditor.tasks.audit",
    "load_checkpoint": "auditor.models.load",
    "load_model": "auditor.models.load",
    "analyze_anatomy": "auditor.models.anatomy",
    "open_subject": "auditor.subject",
    "condition": "auditor.tasks.condition",
    "median_angles": "auditor.analysis.angles",
    "measure_stability": "auditor.analysis.stability",
    "extract_activations": "auditor.tasks.extract",
    "open_store": "auditor.io.store",
    "verify_store": "auditor.io.verify",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'auditor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
