"""Where a run executes and what it leaves: devices, processes (DDP), stop signals, files (atomic writes,
the run-folder lock), job records and reading finished runs. Kept free of torch at import time where an
entry point needs it before the task starts (tab completion imports :mod:`~lmlab.runtime.launch`)."""
