"""Each block's condition numbers of one checkpoint, kept in a cache folder by the checkpoint's digest.

:func:`block_kappas` runs :func:`auditor.tasks.condition.condition` and keeps, per
block, the paper and exact kappas and Lemma 1's verdicts (the "Block fields" of
docs/design.md), with the conditioning summary. With a cache folder the result
is written there as JSON under a name derived from the checkpoint's SHA-256 and
every other input of the numbers, and read back on the next run instead of
being computed again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from ..report.document import dumps, write_atomic
from ..subject import Subject
from .condition import condition

__all__ = ["BLOCK_KEYS", "BlockKappas", "block_kappas", "kappas_cache_name"]

CACHE_FORMAT = "resdyn-block-kappas"
CACHE_VERSION = "1"
BLOCK_KEYS = (
    "name", "stage", "shortcut", "kappa_paper_residual", "kappa_paper_plain", "kappa_linear_residual",
    "kappa_linear_plain", "lemma1_upper_holds", "lemma1_lower_holds", "infinite",
)


@dataclass(frozen=True)
class BlockKappas:
    """The blocks' kappas of one checkpoint.

    Attributes
    ----------
    blocks : list of dict
        Per block: ``BLOCK_KEYS`` and the ``*_reason`` of each missing kappa.
    summary : dict
        :meth:`auditor.tasks.condition.ConditionReport.summary`.
    cache : Path or None
        The cache file, when a cache folder was given.
    reused : bool
        Read from the cache instead of computed.
    """

    blocks: list[dict[str, Any]]
    summary: dict[str, Any]
    cache: Path | None = None
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The ``condition`` object of a trajectory point."""
        return {"cache": str(self.cache) if self.cache else None, "reused": self.reused,
                "blocks": self.blocks, "summary": self.summary}


def kappas_cache_name(subject: Subject, fold_bn: bool) -> str:
    """A file name that changes whenever the kappas would: the checkpoint's digest, architecture, input shape, folding."""
    digest = hashlib.sha256()
    for part in (subject.checkpoint.sha256, subject.loaded.arch, json.dumps(list(subject.anatomy.input_shape)),
                 str(fold_bn), CACHE_VERSION):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"kappas-{subject.checkpoint.sha256[:12]}-{digest.hexdigest()[:16]}.json"


def _kept(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k in BLOCK_KEYS or (k.endswith("_reason") and k[:-7] in BLOCK_KEYS)}


def _read(path: Path, subject: Subject) -> BlockKappas | None:
    """The cached kappas, or None when the file is missing, unreadable or from other inputs."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("format") != CACHE_FORMAT \
            or document.get("format_version") != CACHE_VERSION or document.get("sha256") != subject.checkpoint.sha256 \
            or not isinstance(document.get("blocks"), list) or not isinstance(document.get("summary"), dict):
        return None
    return BlockKappas(document["blocks"], document["summary"], path, True)


def block_kappas(subject: Subject, *, cache: Path | None = None, fold_bn: bool = True,
                 device: str = "cpu") -> BlockKappas:
    """Every block's paper and exact kappa and Lemma 1's verdicts, from the cache when it holds them.

    Parameters
    ----------
    subject : Subject
    cache : Path, optional
        Folder for the cache file (see :func:`kappas_cache_name`); None: computed every time.
    fold_bn : bool
        Fold eval-mode BatchNorm (as ``condition``).
    device : str

    Returns
    -------
    BlockKappas
    """
    path = cache / kappas_cache_name(subject, fold_bn) if cache is not None else None
    if path is not None:
        found = _read(path, subject)
        if found is not None:
            return found
    report = condition(subject, fold_bn=fold_bn, device=device)
    result = BlockKappas([_kept(b) for b in report.block_entries()], report.summary(), path, False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, dumps({"format": CACHE_FORMAT, "format_version": CACHE_VERSION, "tool_version": __version__,
                                  "sha256": subject.checkpoint.sha256, "arch": subject.loaded.arch, "fold_bn": fold_bn,
                                  "blocks": result.blocks, "summary": result.summary}))
    return result
