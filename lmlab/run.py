"""``python -m lmlab.run``: compose the config, build every object, train, test, generate.

    python -m lmlab.run model=lstm trainer.epochs=20
    python -m lmlab.run -m dataset.batch_size=20,40 model.hidden_dim=200,650

Outputs land in Hydra's run folder: metrics.jsonl, results.json, checkpoints/, samples.txt, .hydra/.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lmlab.checkpoint import load_checkpoint
from lmlab.cli import CONF_DIR, build, exit_on_lmlab_error
from lmlab.config import validate_config
from lmlab.device import peak_gpu_mb, peak_rss_mb
from lmlab.generate import format_words, generate_words
from lmlab.interrupt import TrainingInterrupted
from lmlab.loggers import ConsoleLogger, Logger, MultiLogger
from lmlab.train import perplexity


def seed_everything(seed: int | None) -> None:
    if seed is not None:  # seed 0 is a valid seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def build_logger(cfg: DictConfig, out_dir: Path, group: str | None = None, name: str | None = None) -> Logger:
    """Console + metrics.jsonl always; plus the ``logger`` group's backend, named after the job."""
    loggers: list[Logger] = [ConsoleLogger(out_dir)]
    if cfg.get("logger") and cfg.logger.get("_target_"):
        naming = {"group": cfg.logger.get("group") or group, "name": cfg.logger.get("name") or name}
        config = OmegaConf.to_container(cfg, resolve=True)
        loggers.append(build(cfg.logger, _recursive_=False, out_dir=str(out_dir), run_config=config, **naming))
    return MultiLogger(loggers)


def build_training_objects(cfg: DictConfig) -> tuple[torch.device, Any, torch.nn.Module, torch.optim.Optimizer]:
    """Validate and seed, then build device, data, model and optimizer (shared by run and bench)."""
    validate_config(cfg)
    seed_everything(cfg.seed)
    device = build(cfg.device)
    data = build(cfg.dataset)
    model = build(cfg.model, vocab_size=len(data.vocab)).to(device)
    return device, data, model, build(cfg.optimizer)(model.parameters())


def train_and_report(
    cfg: DictConfig, out_dir: Path, group: str | None = None, name: str | None = None
) -> dict[str, Any]:
    """The whole job: returns (and writes to results.json) the run's final figures.

    ``group``/``name`` label the job for remote loggers (a multirun's folder, the job's overrides).
    """
    started = time.perf_counter()
    device, data, model, optimizer = build_training_objects(cfg)
    scheduler = build(cfg.scheduler)(optimizer) if cfg.get("scheduler") else None
    trainer = build(cfg.trainer)
    logger = build_logger(cfg, out_dir, group, name)
    meta = {
        "model_config": OmegaConf.to_container(cfg.model, resolve=True),
        "vocab": data.vocab.words,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    try:
        fit = trainer.fit(model, data, optimizer, scheduler, device, out_dir, logger, meta)
        model.load_state_dict(load_checkpoint(fit.best_checkpoint, device)["model_state"])
        logger.log_checkpoint(fit.best_checkpoint)
        test_loss = trainer.evaluate(model, data.columns("test").to(device), data.bptt, device)
        gen = cfg.generate
        generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
        text = format_words(
            generate_words(
                model, data.vocab, gen.num_words, gen.temperature, gen.prompt or "", gen.top_k, device, generator
            )
        )
        (out_dir / "samples.txt").write_text(text + "\n")
        results = {
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
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        logger.log_summary(results)
        logger.log_samples(text)
    finally:
        logger.finish()
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
@exit_on_lmlab_error
def main(cfg: DictConfig) -> float:
    """Hydra task: returns the best validation perplexity (what sweepers minimise)."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = "_".join(Path(hydra_cfg.sweep.dir).parts[-2:]) if multirun else None
    name = hydra_cfg.job.override_dirname or out_dir.name
    try:
        return train_and_report(cfg, out_dir, group, name)["best_val_ppl"]
    except TrainingInterrupted as stop:
        overrides = " ".join(HydraConfig.get().overrides.task)
        print(
            f"{stop}\nResume with: python -m lmlab.run {overrides} hydra.run.dir={out_dir}", file=sys.stderr, flush=True
        )
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    main()
