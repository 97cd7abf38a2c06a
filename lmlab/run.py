"""``python -m lmlab.run``: compose the config, build every object, train, test, generate.

    python -m lmlab.run model=lstm trainer.epochs=20
    python -m lmlab.run -m dataset.batch_size=20,40 model.hidden_dim=200,650

Outputs land in Hydra's run folder: metrics.jsonl, results.json, checkpoints/, samples.txt, run.log, .hydra/.
torch and the training library are imported inside the task, so that tab completion (which runs this
module for every TAB) does not pay for them.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lmlab.cli import CONF_DIR
from lmlab.errors import ConfigError
from lmlab.interrupt import TrainingInterrupted
from lmlab.jobs import run_with_summary, task_wrapper


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
@task_wrapper
def hydra_task(cfg: DictConfig) -> float:
    """Hydra task: returns the best validation perplexity (what sweepers minimise)."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = "_".join(Path(hydra_cfg.sweep.dir).parts[-2:]) if multirun else None
    name = hydra_cfg.job.override_dirname or out_dir.name
    presets = [o for o in hydra_cfg.overrides.task if o.startswith("+sweep=")]
    if presets and not multirun:
        raise ConfigError(f"{presets[0]} only acts in a multirun; add -m (python -m lmlab.run -m {presets[0]} ...)")
    prefix = f"[job {hydra_cfg.job.num}] " if multirun else ""
    from lmlab.pipeline import train_and_report

    try:
        return train_and_report(cfg, out_dir, group, name, prefix)["best_val_ppl"]
    except TrainingInterrupted as stop:
        overrides = " ".join(shlex.quote(o) for o in hydra_cfg.overrides.task)
        resume = "" if multirun else f"\nResume with: python -m lmlab.run {overrides} hydra.run.dir={out_dir}"
        print(f"{prefix}{stop}{resume}", file=sys.stderr, flush=True)  # a multirun prints the sweep's command
        sys.exit(stop.exit_code)


def main() -> None:
    run_with_summary(hydra_task)


if __name__ == "__main__":
    main()
