"""Failure semantics of a Hydra task, single run or multirun job.

- A single run that hits an lmlab error prints it as one line and exits with that error's code
  (:mod:`lmlab.errors`: 2 for bad input, 3 divergence, 4 checkpoint, 5 disk full, 6 folder busy);
  an interrupt outside the training loop prints one line and exits 130.
- A multirun job that fails writes ``results.json`` (``status: failed``) and ``error.txt`` in its folder
  and raises :class:`JobFailed`, an exception Hydra records per job: the other jobs still run, Optuna
  counts a failed trial. When the sweep is over, :func:`summarize_sweep` prints the sweep folder, a
  table of its jobs (failed ones marked) and the best job, and the command exits 1 if any job failed.

``SweepRecorder`` (a Hydra callback in ``conf/config.yaml``) remembers the sweep folder in the process
that launched the sweep, which is where the summary is printed.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lmlab.cli import SWEPT_KEYS_ENV, process_rank
from lmlab.errors import DiskFull, LmlabError
from lmlab.files import atomic_write_text, is_disk_full
from lmlab.results import find_runs, render, rows

T = TypeVar("T")


class JobFailed(CompactHydraException):
    """A multirun job failed; its folder says why. Hydra prints only this message, not a traceback."""


def task_wrapper(task: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """Wrap a Hydra task function with the failure semantics above."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> T:
        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        try:
            return _disk_full_as_one_line(task, cfg, hydra_cfg.runtime.output_dir)
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
            print("\ninterrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        except LmlabError as err:
            if not multirun:
                if process_rank() == 0:  # every rank meets the same error; one line says it
                    print(f"error: {err}", file=sys.stderr, flush=True)
                    _remove_if_untouched(Path(hydra_cfg.runtime.output_dir))
                sys.exit(err.exit_code)
            _record_failure(Path(hydra_cfg.runtime.output_dir), str(err), str(err))
            raise JobFailed(_job_label(hydra_cfg) + f" failed: {err}") from None
        except Exception as err:  # a bug or a crash: keep the traceback in the job's folder
            if not multirun:
                raise
            message = f"{type(err).__name__}: {err}"
            _record_failure(Path(hydra_cfg.runtime.output_dir), message, traceback.format_exc())
            raise JobFailed(_job_label(hydra_cfg) + f" failed: {message} (traceback in its error.txt)") from None

    return wrapper


def _disk_full_as_one_line(task: Callable[[DictConfig], T], cfg: DictConfig, out_dir: str) -> T:
    """Any write that fails for lack of space (not only checkpoints) becomes :class:`DiskFull`."""
    try:
        return task(cfg)
    except Exception as err:
        if isinstance(err, LmlabError) or not is_disk_full(err):
            raise
        raise DiskFull(f"no space left on the disk ({err}); free space under {out_dir}") from None


HYDRA_ONLY = {".hydra", "run.log"}  # what Hydra writes into a run folder before the task starts


def _remove_if_untouched(out_dir: Path) -> None:
    """A run refused before any work leaves no folder behind: a run folder (Hydra wrote its ``.hydra``
    there) holding nothing else is removed. Tools that run in the current folder write no ``.hydra``."""
    names = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else set()
    if ".hydra" in names and names <= HYDRA_ONLY:
        log = out_dir / "run.log"
        if not log.exists() or log.stat().st_size == 0:
            shutil.rmtree(out_dir, ignore_errors=True)


def _job_label(hydra_cfg: Any) -> str:
    return f"job {hydra_cfg.job.num} ({hydra_cfg.job.override_dirname or 'no overrides'})"


def _record_failure(out_dir: Path, message: str, detail: str) -> None:
    if process_rank() != 0:  # the SLURM tasks of one multi-process job share a folder: rank 0 records it
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "error.txt", detail.rstrip() + "\n")
    atomic_write_text(out_dir / "results.json", json.dumps({"status": "failed", "error": message}, indent=2) + "\n")
    print(f"error: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ sweep summary
SWEEP_FUNCTIONS = {"range", "choice", "interval", "glob", "tag"}  # Hydra's sweep override functions
_sweep_dir: Path | None = None
_sweep_overrides: list[str] = []


class SweepRecorder(Callback):
    """Remembers the sweep folder of a multirun started in this process, and tells the jobs (through
    the environment, which every launcher passes on) which keys vary, for their folder names."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweep_dir, _sweep_overrides
        _sweep_dir, _sweep_overrides = Path(config.hydra.sweep.dir), list(config.hydra.overrides.task)
        swept = set((config.hydra.sweeper.get("params") or {}).keys())  # presets and Optuna's search space
        for override in config.hydra.overrides.task:
            key, _, value = override.partition("=")
            comma_list = "," in value and not value.startswith("[")  # a=1,2 sweeps; a=[1,2] is one list value
            if comma_list or value.split("(")[0] in SWEEP_FUNCTIONS:
                swept.add(key.lstrip("+~"))
        os.environ[SWEPT_KEYS_ENV] = ",".join(sorted(swept))
        if "optuna" in str(config.hydra.sweeper.get("_target_", "")):
            import optuna  # the sweeper's own dependency; quiet before it creates the study

            optuna.logging.set_verbosity(optuna.logging.WARNING)  # its coloured study notes stay off the console


def run_with_summary(hydra_main: Callable[[], Any]) -> None:
    """Call a ``@hydra.main`` function; after a multirun, print its summary and exit non-zero if any job
    failed (Hydra itself may already have stopped with exit 1 after a failed batch)."""
    code: Any = 0
    try:
        hydra_main()
    except SystemExit as stop:
        code = stop.code
    if _sweep_dir is not None:
        failed = summarize_sweep(_sweep_dir)
        code = code or (1 if failed else 0)
        if code in (130, 143):  # interrupted: every job resumes from its own last.pt
            args = " ".join(shlex.quote(o) for o in _sweep_overrides if not o.startswith("hydra.sweep.dir="))
            print(
                f"Resume the whole sweep with: python -m lmlab.run -m {args} hydra.sweep.dir={_sweep_dir}", flush=True
            )
    if code:
        sys.exit(code)


def summarize_sweep(sweep_dir: Path) -> int:
    """Print the sweep's folder, its jobs as a table and the best one; returns the number that failed."""
    runs = find_runs([sweep_dir])
    failed = [r for r in runs if r.failed]
    print(f"\nmultirun folder: {sweep_dir} ({len(runs) - len(failed)} finished, {len(failed)} failed)", flush=True)
    if runs:
        print(render(rows(runs), "table"), end="", flush=True)
    if len(failed) < len(runs):
        best = runs[0]
        print(f"best job: {best.folder} (val ppl {best.results['best_val_ppl']:.2f})", flush=True)
    for run in failed:
        print(f"failed job: {run.folder}: {run.results.get('error', '?')}", file=sys.stderr, flush=True)
    return len(failed)
