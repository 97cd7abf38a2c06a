"""``python -m lmlab.run``: compose the config, build every object, train, test, generate.

    python -m lmlab.run model=lstm trainer.epochs=20
    python -m lmlab.run -m dataset.batch_size=20,40 model.hidden_dim=200,650

Outputs land in Hydra's run folder: metrics.jsonl, results.json, checkpoints/, samples.txt, .hydra/.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lmlab.checkpoint import load_checkpoint
from lmlab.cli import CONF_DIR
from lmlab.device import peak_gpu_mb, peak_rss_mb
from lmlab.errors import ConfigError
from lmlab.factory import build_logger, build_training_objects, checkpoint_meta
from lmlab.files import RunLock, atomic_write_text
from lmlab.interrupt import StopSignals, TrainingInterrupted
from lmlab.jobs import run_with_summary, task_wrapper
from lmlab.loggers import perplexity
from lmlab.sampling import format_words, sample_words


def train_and_report(
    cfg: DictConfig, out_dir: Path, group: str | None = None, name: str | None = None, prefix: str = ""
) -> dict[str, Any]:
    """The whole job: returns (and writes to results.json) the run's final figures.

    ``group``/``name`` label the job for remote loggers (a multirun's folder, the job's overrides);
    ``prefix`` starts each console line (a multirun job's number).
    """
    started = time.perf_counter()
    with RunLock(out_dir):  # one writer per run folder, taken before anything is written
        return _train_and_report(cfg, out_dir, (group, name, prefix), started)


def _train_and_report(cfg: DictConfig, out_dir: Path, labels: tuple, started: float) -> dict[str, Any]:
    objects = build_training_objects(cfg)
    device, data, model, trainer = objects.device, objects.data, objects.model, objects.trainer
    logger = build_logger(cfg, out_dir, *labels)
    meta = checkpoint_meta(cfg, data.vocab.words)
    try:
        fit = trainer.fit(model, data, objects.optimizer, objects.schedule, device, out_dir, logger, meta)
        with StopSignals() as signals:  # test and generation stop on a signal too (last.pt is already saved)
            model.load_state_dict(load_checkpoint(fit.best_checkpoint, device)["model_state"])
            logger.log_checkpoint(fit.best_checkpoint)
            test_loss = trainer.evaluate(model, data.stream("test").to(device), device)
            signals.raise_if_received(fit.last_checkpoint)
            generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
            text = format_words(sample_words(model, data.vocab, **cfg.generate, generator=generator))
            signals.raise_if_received(fit.last_checkpoint)
        atomic_write_text(out_dir / "samples.txt", text + "\n")
        results = {
            "status": "completed",
            "best_val_loss": fit.best_val_loss,
            "best_val_ppl": perplexity(fit.best_val_loss),
            "test_loss": test_loss,
            "test_ppl": perplexity(test_loss),
            "num_params": sum(p.numel() for p in model.parameters()),
            "epochs_run": fit.epochs_run,
            "train_tokens_per_sec": fit.train_tokens_per_sec,
            "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": peak_gpu_mb(device),
            "torch_threads": torch.get_num_threads(),
            "wall_s": time.perf_counter() - started,
        }
        atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
        logger.log_summary(results)
        logger.log_samples(text)
    finally:
        logger.finish()
    return results


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
    try:
        return train_and_report(cfg, out_dir, group, name, prefix)["best_val_ppl"]
    except TrainingInterrupted as stop:
        overrides = " ".join(HydraConfig.get().overrides.task)
        print(
            f"{stop}\nResume with: python -m lmlab.run {overrides} hydra.run.dir={out_dir}", file=sys.stderr, flush=True
        )
        sys.exit(stop.exit_code)


def main() -> None:
    run_with_summary(hydra_task)


if __name__ == "__main__":
    main()
