"""Failure semantics of a Hydra task, single run or multirun job.

- A single run that hits an lmlab error prints it as one line and exits with that error's code
  (:mod:`lmlab.errors`: 2 for bad input, 3 divergence, 4 checkpoint, 5 disk full, 6 folder busy);
  an interrupt outside the training loop prints one line and exits 130.
- A multirun job that fails writes ``results.json`` (``status: failed``) and ``error.txt`` in its folder
  and raises :class:`JobFailed`, an exception Hydra records per job: the other jobs still run, Optuna
  counts a failed trial. When the sweep is over, :func:`summarize_sweep` prints the sweep folder, a
  table of its jobs (failed ones marked) and the best job, and the command exits 1 if any job failed.

``JobRecorder`` (a Hydra callback in ``conf/run.yaml``) remembers the sweep folder in the process
that launched the sweep, which is where the summary is printed, and a single run's folder as it was.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmlab.errors import ConfigError, DiskFull, LmlabError, RunFolderBusy, printable
from lmlab.runtime.files import (
    atomic_write_text,
    first_missing,
    is_disk_full,
    plain_yaml,
    read_record,
    remove_made_folders,
)
from lmlab.runtime.launch import SWEPT_KEYS_ENV, process_rank, task_overrides
from lmlab.runtime.run_log import RunLog
from lmlab.runtime.run_table import find_runs, render, rows

T = TypeVar("T")


class JobFailed(CompactHydraException):
    """A multirun job failed; its folder says why. Hydra prints only this message, not a traceback."""


def task_wrapper(task: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """Wrap a Hydra task function with the failure semantics above."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> T:
        hydra_cfg = HydraConfig.get()
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        log = Path(hydra_cfg.runtime.output_dir) / "run.log"
        # Every console line of the run, its error included, lands in run.log once the run holds the folder.
        with RunLog(log, job_prefix(hydra_cfg)) if process_rank() == 0 else contextlib.nullcontext():
            return _with_failure_semantics(task, cfg, hydra_cfg, multirun)

    return wrapper


def job_prefix(hydra_cfg: Any) -> str:
    """What a multirun job's console lines start with (``[job 3] ``); nothing for a single run."""
    return f"[job {hydra_cfg.job.num}] " if hydra_cfg.mode == RunMode.MULTIRUN else ""


def _with_failure_semantics(task: Callable[[DictConfig], T], cfg: DictConfig, hydra_cfg: Any, multirun: bool) -> T:
    try:
        return _disk_full_as_one_line(task, cfg, hydra_cfg.runtime.output_dir)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print("\ninterrupted", file=sys.stderr, flush=True)
        if not multirun and process_rank() == 0:
            _undo_hydra_leftovers(Path(hydra_cfg.runtime.output_dir))  # stopped before it began: no folder
        sys.exit(130)
    except LmlabError as err:
        if not multirun:
            if process_rank() == 0:  # every rank meets the same error; one line says it
                print(f"error: {err}", file=sys.stderr, flush=True)
                _undo_hydra_leftovers(Path(hydra_cfg.runtime.output_dir))
            sys.exit(err.exit_code)
        _record_failure(
            cfg, Path(hydra_cfg.runtime.output_dir), str(err), str(err), busy=isinstance(err, RunFolderBusy)
        )
        raise JobFailed(_job_label(hydra_cfg) + f" failed: {err}") from None
    except Exception as err:  # a bug or a crash: keep the traceback in the job's folder
        if not multirun:
            raise
        message = f"{type(err).__name__}: {err}"
        _record_failure(cfg, Path(hydra_cfg.runtime.output_dir), message, traceback.format_exc())
        raise JobFailed(_job_label(hydra_cfg) + f" failed: {message} (traceback in its error.txt)") from None


def _disk_full_as_one_line(task: Callable[[DictConfig], T], cfg: DictConfig, out_dir: str) -> T:
    """Any write that fails for lack of space (not only checkpoints) becomes :class:`DiskFull`; a config value
    that cannot be resolved (``${oc.env:UNSET}``, a resolver that does not exist) a :class:`ConfigError`."""
    try:
        return task(cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        if key.startswith("hydra."):  # resolved while Hydra named the job's folder: the override is the culprit
            key = " ".join(o for o in task_overrides(HydraConfig.get()) if "${" in o)
        where = f"{key}: " if key else ""
        raise ConfigError(
            f"{where}{printable(str(err).splitlines()[0], 300)}; set it to a plain value (or define what it reads)"
        ) from None
    except Exception as err:
        if isinstance(err, LmlabError) or not is_disk_full(err):
            raise
        raise DiskFull(f"no space left on the disk ({err}); free space under {out_dir}") from None


def write_run_record(cfg: DictConfig, out_dir: Path) -> None:
    """Hydra's record of the run — ``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml`` — written by
    lmlab once the run holds its folder and proved sound. ``conf/run.yaml`` sets
    ``hydra.output_subdir: null`` so that Hydra does not write it before the task starts: a run refused
    at a folder that another run owns (busy, or finished) would otherwise replace that run's record."""
    record = Path(out_dir) / ".hydra"
    hydra_node = HydraConfig.instance().cfg  # {"hydra": ...}, as Hydra saves it
    for name, node in (
        ("config.yaml", cfg),
        ("hydra.yaml", hydra_node),
        ("overrides.yaml", hydra_node.hydra.overrides.task),
    ):
        atomic_write_text(record / name, OmegaConf.to_yaml(node))


@dataclass(frozen=True)
class _FolderBefore:
    """A single run's folder as it was before Hydra made it (or its job log) for this run."""

    path: Path
    made: Path | None  # the outermost folder that did not exist yet (Hydra makes it and those inside)
    names: frozenset[str]  # what the folder held

    @classmethod
    def look(cls, folder: Path) -> _FolderBefore:
        names = frozenset(p.name for p in folder.iterdir()) if folder.is_dir() else frozenset()
        return cls(folder, first_missing(folder), names)


_folder_before: _FolderBefore | None = None


def _undo_hydra_leftovers(out_dir: Path) -> None:
    """A refused single run leaves the file system as it found it: the empty job log Hydra's logging
    added (``run.log``, ``bench.log``) goes, then the folders Hydra made for the run, if empty. Tools
    that run in the current folder (evaluate, generate) write nothing there."""
    before = _folder_before
    if before is None or before.path != out_dir.resolve():
        return
    for log in out_dir.glob("*.log"):
        if log.name not in before.names and log.is_file() and log.stat().st_size == 0:
            log.unlink()
    remove_made_folders(before.path, before.made)


def _job_label(hydra_cfg: Any) -> str:
    return f"job {hydra_cfg.job.num} ({hydra_cfg.job.override_dirname or 'no overrides'})"


def _record_failure(cfg: DictConfig, out_dir: Path, message: str, detail: str, busy: bool = False) -> None:
    """A failed multirun job records why in its folder (with the run record, so the summary shows its
    overrides) — unless the folder is another live run's, or holds a finished run, which stay as they were."""
    if process_rank() != 0:  # the SLURM tasks of one multi-process job share a folder: rank 0 records it
        return
    print(f"error: {message}", file=sys.stderr, flush=True)
    if busy or finished_results(out_dir) is not None:
        return
    if not (out_dir / ".hydra").exists():
        write_run_record(cfg, out_dir)
    atomic_write_text(out_dir / "error.txt", detail.rstrip() + "\n")
    atomic_write_text(out_dir / "results.json", json.dumps({"status": "failed", "error": message}, indent=2) + "\n")


def finished_results(out_dir: Path) -> dict[str, Any] | None:
    """The figures of a run that completed in ``out_dir`` (its ``results.json``), else None."""
    try:
        results = json.loads(read_record(Path(out_dir) / "results.json"))
    except (OSError, ValueError, RecursionError):
        return None
    done = isinstance(results, dict) and results.get("status") == "completed"
    return results if done and isinstance(results.get("best_val_ppl"), (int, float)) else None


def overrides_differ(out_dir: Path, overrides: list[str]) -> str | None:
    """How the overrides a finished job in ``out_dir`` recorded differ from ``overrides`` (a resumed sweep's
    job now), in a few words; None when they are the same (in any order)."""
    try:
        recorded = plain_yaml(read_record(Path(out_dir) / ".hydra" / "overrides.yaml")) or []
    except (OSError, ValueError, yaml.YAMLError):
        recorded = None
    if not isinstance(recorded, list):
        return "its record of them (.hydra/overrides.yaml) cannot be read"
    before, now = {str(o) for o in recorded}, {str(o) for o in overrides}
    if before == now:
        return None
    gone, new = sorted(before - now), sorted(now - before)
    parts = ([f"it ran with {' '.join(gone)}"] if gone else []) + ([f"now {' '.join(new)}"] if new else [])
    return printable("; ".join(parts), 300)


# ------------------------------------------------------------------------------------ sweep summary
SWEEP_FUNCTIONS = {"range", "choice", "interval", "glob", "tag"}  # Hydra's sweep override functions
_sweep_dir: Path | None = None
_sweep_before: _FolderBefore | None = None  # the sweep folder before this sweep
_sweep_overrides: list[str] = []
# Lines a sweep's own callbacks add after its table (the ensemble of its jobs,
# :class:`lmlab.evaluation.sweep_ensemble.EnsembleOfSweep`): each prints its line and returns 1 if what it
# reports failed, which fails the sweep's command.
SummaryLine = Callable[[Path], int]
_summary_lines: list[SummaryLine] = []


def add_to_sweep_summary(line: SummaryLine) -> None:
    """Have this process's sweep summary call ``line(sweep_dir)`` after its table (once per sweep)."""
    _summary_lines.append(line)


class JobRecorder(Callback):
    """Remembers what a launch in this process starts from: a single run's folder as it was (so that a
    refused run can leave it so), a multirun's sweep folder (for the summary), and tells the sweep's
    jobs (through the environment, which every launcher passes on) which keys vary, for their folder
    names."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _folder_before
        _folder_before = _FolderBefore.look(Path(config.hydra.run.dir).resolve())  # ${now:} is cached: the same folder

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweep_dir, _sweep_overrides, _sweep_before
        _sweep_dir, _sweep_overrides = Path(config.hydra.sweep.dir), list(config.hydra.overrides.task)
        _sweep_before = _FolderBefore.look(_sweep_dir.resolve())
        # presets and Optuna's search space; a group added per job (+experiment) is keyed without its +
        swept = {key.lstrip("+~") for key in (config.hydra.sweeper.get("params") or {})}
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
    if _sweep_dir is not None and code == 1 and not find_runs([_sweep_dir]):
        _undo_refused_sweep()  # Hydra refused the sweep (its message is above) before any job started
    elif _sweep_dir is not None:
        failed = summarize_sweep(_sweep_dir)
        code = code or (1 if failed else 0)
        if code in (130, 143):  # interrupted: every job resumes from its own last.pt
            args = " ".join(shlex.quote(o) for o in _sweep_overrides if not o.startswith("hydra.sweep.dir="))
            print(
                f"Resume the whole sweep with: python -m lmlab.run -m {args} hydra.sweep.dir={_sweep_dir}", flush=True
            )
    if code:
        sys.exit(code)


def _undo_refused_sweep() -> None:
    """A sweep that ran no job leaves the file system as it found it: the ``multirun.yaml`` Hydra wrote goes,
    then the folders it made, if empty."""
    before = _sweep_before
    if before is None:
        return
    record = before.path / "multirun.yaml"
    if "multirun.yaml" not in before.names and record.is_file():
        record.unlink()
    remove_made_folders(before.path, before.made)
    print("the sweep ran no job (refused above); nothing was written", file=sys.stderr, flush=True)


def summarize_sweep(sweep_dir: Path) -> int:
    """Print the sweep's folder, its jobs as a table and the best one; returns the number that failed."""
    runs = find_runs([sweep_dir])
    failed = [r for r in runs if r.failed]
    finished = [r for r in runs if r.finished]
    unfinished = len(runs) - len(finished) - len(failed)
    counts = f"{len(finished)} finished, {len(failed)} failed" + (f", {unfinished} unfinished" if unfinished else "")
    print(f"\nmultirun folder: {sweep_dir} ({counts})", flush=True)
    if runs:
        print(render(rows(runs), "table"), end="", flush=True)
    if finished:
        best = finished[0]
        print(f"best job: {best.folder} (val ppl {best.results['best_val_ppl']:.2f})", flush=True)
    for run in failed:
        print(f"failed job: {run.folder}: {printable(run.results.get('error', '?'), 500)}", file=sys.stderr, flush=True)
    return len(failed) + sum(line(sweep_dir) for line in _summary_lines)
