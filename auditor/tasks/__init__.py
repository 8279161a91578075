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
- :mod:`.images`: an image folder prepared for a subject; ``open_data``, the one opening step
  (checkpoint and images) of every task that reads images.
- :mod:`.data_request`: ``DataRequest``, what a command asks of its images (torch-free).
- :mod:`.sources`: the ``data`` report of a project's named data sources.

Importing this package imports nothing heavy.
"""
