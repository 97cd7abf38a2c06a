"""``python -m lmlab.run``: compose the config, build every object, train, test, generate.

    python -m lmlab.run model=lstm trainer.epochs=20
    python -m lmlab.run -m dataset.batch_size=20,40 model.hidden_dim=200,650

Outputs land in Hydra's run folder: metrics.jsonl, results.json, checkpoints/, samples.txt, run.log, and
.hydra/ (the run record, written once the run holds the folder: see lmlab.runtime.job_records.write_run_record).
torch and the training library are imported inside the task, so that tab completion (which runs this
module for every TAB) does not pay for them.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

import lmlab.runtime.cpu_load  # noqa: F401  (first of lmlab: its sample of the machine's load starts now)
from lmlab.config import CONF_DIR, moved_key
from lmlab.config.help import answer_help
from lmlab.errors import ConfigError, printable
from lmlab.runtime.files import folder_refusal
from lmlab.runtime.job_records import (
    finished_results,
    job_prefix,
    overrides_differ,
    run_with_summary,
    task_wrapper,
    write_run_record,
)
from lmlab.runtime.launch import launched_processes, process_rank, task_overrides, under_torchrun
from lmlab.runtime.run_log import begin_run_log
from lmlab.runtime.signals import TrainingInterrupted


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="run")
@task_wrapper
def hydra_task(cfg: DictConfig) -> float:
    """Hydra task: returns the best validation perplexity (what sweepers minimise)."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = "_".join(Path(hydra_cfg.sweep.dir).parts[-2:]) if multirun else None
    # A dashboard's run name: a sweep job's folder name (its number and the swept keys, short) or a run's overrides.
    name = out_dir.name if multirun else hydra_cfg.job.override_dirname or out_dir.name
    overrides = task_overrides(hydra_cfg)
    presets = [o for o in overrides if o.startswith("+sweep=")]
    if presets and not multirun:
        raise ConfigError(f"{presets[0]} only acts in a multirun; add -m (python -m lmlab.run -m {presets[0]} ...)")
    prefix = job_prefix(hydra_cfg)
    if process_rank() == 0:  # the banner's first lines, before torch is imported (seconds on a slow machine)
        command = "torchrun -m lmlab.run" if under_torchrun() else "python -m lmlab.run"
        print(f"{prefix}lmlab run: {command} {' '.join(shlex.quote(o) for o in overrides)}".rstrip())
        print(f"{prefix}run folder: {out_dir}", flush=True)
    from lmlab.job import train_and_report
    from lmlab.runtime import distributed

    where = distributed.place()  # under torchrun the group exists already (see main); under SLURM not yet

    def on_started() -> None:  # the run holds its folder and proved sound: only now is it recorded there
        if process_rank() == 0:
            write_run_record(cfg, out_dir)
            begin_run_log()  # the lines held so far (the banner), then every line as it is printed
        if where.world_size > 1 and where.is_main:  # the other ranks wait in main() for the folder
            distributed.broadcast(str(out_dir))

    if multirun and where.world_size == 1:
        place_on_a_gpu(cfg, hydra_cfg.job.num, prefix)
    finished = finished_results(out_dir)
    changed = overrides_differ(out_dir, overrides) if finished is not None else None
    if changed and not multirun:  # more epochs, another test: the run resumes from its last.pt (or is refused)
        finished = changed = None
    if changed:  # the folder's figures are another config's: neither reused nor written over
        raise ConfigError(
            f"{out_dir} holds a finished job with other overrides ({changed}); resume a sweep with the overrides "
            "it was started with, or give this one a new hydra.sweep.dir"
        )
    if finished is not None:  # the same command again, or a resumed sweep: its folder and figures stay as they are
        print(f"{prefix}finished before, kept as it was: {out_dir}", flush=True)
        if not multirun:
            print(f"(to train it further: the same command with a larger trainer.epochs; {out_dir}/results.json "
                  "has its figures)", flush=True)  # fmt: skip
        return finished["best_val_ppl"]
    try:
        return train_and_report(cfg, out_dir, group, name, prefix, on_started=on_started)["best_val_ppl"]
    except TrainingInterrupted as stop:
        typed = " ".join(shlex.quote(o) for o in overrides)
        now = distributed.place()  # under SLURM the group was joined after `where` was looked up
        command = (
            f"torchrun --nproc_per_node={now.world_size} -m lmlab.run" if now.world_size > 1 else "python -m lmlab.run"
        )
        resume = "" if multirun else f"\nResume with: {command} {typed} hydra.run.dir={out_dir}"
        if now.is_main:  # a multirun prints the sweep's command
            print(f"{prefix}{stop}{resume}", file=sys.stderr, flush=True)
        stop.hand_on()  # SLURM pre-emption: submitit requeues the job now that last.pt is saved
        sys.exit(stop.exit_code)


def place_on_a_gpu(cfg: DictConfig, job_num: int, prefix: str = "") -> None:
    """A multirun job on a machine with several GPUs takes GPU ``job_num mod count`` unless the config
    names one (``device.index``) or runs on something else (the choice lands in the job's record)."""
    import torch

    from lmlab.runtime.devices import place_sweep_job

    if cfg.device.get("name") not in ("auto", "cuda") or cfg.device.get("index") is not None:
        return
    index = place_sweep_job(job_num, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if index is not None:
        with open_dict(cfg):
            cfg.device.index = index
        print(f"{prefix}on GPU {index}", flush=True)


def register_bundled_plugins() -> None:
    """Make lmlab's own Hydra plugin (``+sweep=optuna``'s sweeper) known however lmlab is installed.

    Hydra finds plugins by listing the ``hydra_plugins`` namespace package's folders; an editable install
    (setuptools' PEP 660 import hook) serves ``hydra_plugins.lmlab_optuna`` to ``import`` but not to that
    listing, so outside the checkout the sweeper was an "Unknown plugin class". Registering the class
    through Hydra's own ``Plugins.register`` works for every install (a second registration is a no-op).
    The module imports only Hydra; optuna is imported when a sweep starts."""
    try:
        from hydra_plugins.lmlab_optuna.optuna_all_trials import OptunaAllTrialsSweeper
    except ImportError:  # installed without hydra_plugins (a plain copy of lmlab/): nothing to register
        return
    from hydra.core.plugins import Plugins

    Plugins.instance().register(OptunaAllTrialsSweeper)


USAGE = """python -m lmlab.run [group=option ...] [key=value ...]        one run (outputs/DAY/TIME/)
python -m lmlab.run -m [key=a,b ...] [+sweep=preset]            a sweep (multirun/DAY/TIME/N_.../)"""


def main() -> None:
    answer_help("lmlab.run", "run", USAGE)
    moved = moved_key(sys.argv[1:])
    if moved:
        print(f"error: {moved}", file=sys.stderr)
        sys.exit(2)
    for argument in sys.argv[1:]:  # Hydra makes these folders before lmlab runs: refused here, in one line
        key, _, folder = argument.partition("=")
        refusal = folder_refusal(folder) if key in ("hydra.run.dir", "hydra.sweep.dir") and folder else None
        if refusal:
            print(
                f"error: {key}={printable(folder, 120)} cannot be a run folder: {refusal}; give another",
                file=sys.stderr,
            )
            sys.exit(2)
    register_bundled_plugins()
    if under_torchrun() and launched_processes()[1] > 1:
        _join_torchrun()
    run_with_summary(hydra_task)


def _join_torchrun() -> None:
    """Under torchrun every process runs this module. Rank 0 composes the config, creates the run folder
    and builds the run as a single run would (tokenising the data once, into the cache); once that
    proved sound the other ranks get its folder and run there without writing Hydra's files or logs
    (only rank 0 writes), with their stdout quiet. A refused run stops at rank 0 and leaves no folder."""
    if {"-m", "--multirun"} & set(sys.argv[1:]):
        if process_rank() == 0:
            print("error: torchrun runs one job over several processes; a sweep (-m) of multi-process jobs "
                  "is hydra/launcher=slurm with hydra.launcher.tasks_per_node=N", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    from lmlab.runtime import distributed

    where = distributed.setup()
    if where.is_main:
        return
    out_dir = distributed.broadcast(None)
    sys.argv += [f"hydra.run.dir={out_dir}", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


if __name__ == "__main__":
    main()
