"""The orchestration layer: one module per task a command runs.

Each task takes a :class:`~auditor.subject.Subject` (and images where it needs
them), calls the analysis, io and model layers, and returns a typed result whose
``to_document()`` is the command's JSON report. The CLI parses, calls a task,
renders; notebooks call the same functions.

- :mod:`.condition`: exact operator spectra and block condition numbers.
- :mod:`.extract`: stage activations into an HDF5 store.
- :mod:`.geometry`: median principal angles per stage (of a store, or extract + angles).
- :mod:`.stability`: perturbation growth through the blocks at real inputs.
- :mod:`.trajectory`: class geometry across the checkpoints of a training run.
- :mod:`.audit`: all of the above in one report, with a verdict.
- :mod:`.images`: an image folder prepared for a subject (shared by the tasks).

Importing this package imports nothing heavy.
"""
