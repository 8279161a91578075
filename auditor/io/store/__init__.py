"""The HDF5 activation store (docs/design.md, "HDF5 activation store (contract)").

Layout of a store::

    /                    attrs: format, format_version, tool_version, checkpoint_sha256,
                                arch, data_root, preset, preprocessing (JSON), seed,
                                per_class (-1: every image), shard (JSON [rank, world]),
                                dtype, compression, samples_sha256, num_selected,
                                stages (JSON list of names, in order), written,
                                skipped (JSON list of {path, reason}), complete, created
    /classes             utf-8 strings, by label
    /samples/path        utf-8 strings (N,), relative to data_root
    /samples/label       int64 (N,)
    /stages/<name>       (N, *shape), chunks of whole samples (k, *shape), k * sample
                         <= 256 KiB or k = 1, k <= 64; attrs module_path
                         ("module:input" or "module:output"), shape, encoding

Since format 1.1 every chunk of ``samples/label`` and ``stages/*`` carries a
Fletcher-32 checksum (HDF5's filter, checked on every read), and a finished
store has ``rows_sha256``: the sha256 of its stored rows' labels and paths
(variable-length strings cannot carry a filter). Stores of format 1.0 have
neither; they are read with a warning that damage cannot be detected.

``encoding`` is ``float32``, ``float16`` or ``bfloat16``. HDF5 has no
bfloat16 type: those stages hold the raw bits as ``uint16`` and the reader
decodes them to float32 (exactly: a bfloat16 is the top half of a float32).

Writing (:class:`StoreWriter`) goes to ``<name>.partial`` beside the final
path, under an exclusive lock on ``<name>.lock``. After every batch the rows,
the ``written`` counter and the ``skipped`` list are flushed together, so a
killed run leaves a prefix that the next run with the same provenance resumes
from. The rows are flushed before the counter that covers them, so the
counter never runs ahead of the data. HDF5 is not crash-consistent (a kill in
the middle of a metadata write leaves bookkeeping that is unsafe to write
into), so no file a killed process had open is ever written again
(:mod:`.rebuild`): a new store is laid out in ``<name>.partial.new`` and
renamed to ``.partial``; a resume opens the ``.partial`` read-only, reads back
every chunk below the counter (checksums, finite values, paths and labels
against the sample list, :mod:`auditor.io.integrity`), copies the rows up to
the last verified chunk into a fresh ``.partial.new`` and renames it over the
``.partial``. Only a finished store is renamed (atomically) to the final
name. Everything but the ``created`` attribute is identical whether or not a
run was interrupted.

A write that fails (no space, I/O error) raises :class:`OutputError` naming
the file and the cause; the unfinished file is kept when a resume can use it
and removed otherwise.

The package, one job a module: :mod:`.layout` (format, provenance, datasets of a
new file), :mod:`.encoding` (float32 / float16 / bfloat16 in and out),
:mod:`.lock` (one writer per store), :mod:`.resume` (where an unfinished file
goes on), :mod:`.rebuild` (fresh files: layout and resume copies), :mod:`.writer` (:class:`StoreWriter`), :mod:`.reader`
(:func:`open_store`), :mod:`.faults` (the test suite's kill hook).
"""

from __future__ import annotations

from .faults import FAULT_PHASES
from .layout import COMPRESSIONS, DTYPES, FORMAT, FORMAT_VERSION, PROVENANCE_KEYS, StoreHeader, rows_digest
from .lock import StoreBusyError, wait_for_writer
from .reader import ActivationStore, UnverifiedStoreWarning, open_store
from .writer import StoreExistsError, StoreWriter

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "DTYPES",
    "COMPRESSIONS",
    "PROVENANCE_KEYS",
    "FAULT_PHASES",
    "StoreHeader",
    "StoreWriter",
    "StoreBusyError",
    "StoreExistsError",
    "ActivationStore",
    "UnverifiedStoreWarning",
    "open_store",
    "rows_digest",
    "wait_for_writer",
]
