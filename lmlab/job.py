"""One training job, start to end: build, train, test the best checkpoint, generate, report.

Used by ``lmlab.run`` (one call per run or multirun job); takes a composed config and a run folder.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lmlab.data.batching import TokenStream
from lmlab.errors import LmlabError
from lmlab.evaluation.methods import EvaluationInputs, check_before_work
from lmlab.evaluation.sampling import format_words, sample_words
from lmlab.factory import build_logger, build_training_objects, checkpoint_meta
from lmlab.loggers.base import Logger
from lmlab.metrics import no_better_than_uniform, perplexity, uniform_guess_warning
from lmlab.runtime import distributed
from lmlab.runtime.devices import peak_gpu_mb, peak_rss_mb
from lmlab.runtime.files import RunLock, atomic_write_text
from lmlab.runtime.launch import process_rank
from lmlab.runtime.signals import StopSignals, TrainingInterrupted
from lmlab.training.checkpoint_format import load_checkpoint
from lmlab.training.trainer import EvaluationStopped
from lmlab.validation import test_methods


def train_and_report(
    cfg: DictConfig,
    out_dir: Path,
    group: str | None = None,
    name: str | None = None,
    prefix: str = "",
    on_started: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The whole job: returns (and writes to results.json) the run's final figures.

    ``group``/``name`` label the job for remote loggers (a multirun's folder, the job's overrides);
    ``prefix`` starts each console line (a multirun job's number). ``on_started`` is called once the
    run is set up — every object built, a ``last.pt`` resumed — just before its first step: the moment
    the run owns its folder (a run refused before then has written nothing there).
    """
    started = time.perf_counter()
    # One writer per run folder, taken before anything is written; under several processes that is rank 0.
    # (Read from the environment: under SLURM the processes join their group only later, when building.)
    with RunLock(out_dir) if process_rank() == 0 else contextlib.nullcontext():
        return _train_and_report(cfg, out_dir, (group, name, prefix), started, on_started)


def _train_and_report(cfg: DictConfig, out_dir: Path, labels: tuple, started: float, on_started: Any) -> dict[str, Any]:
    prefix = labels[2]
    say = (lambda line: print(f"{prefix}{line}", flush=True)) if process_rank() == 0 else None
    objects = build_training_objects(cfg, say=say)
    device, data, model, trainer = objects.device, objects.data, objects.model, objects.trainer
    methods = test_methods(cfg)
    for method_name, (_, settings) in methods.items():  # refused now, not after the training
        check_before_work(method_name, settings, data.vocab)
    where = distributed.place()
    logger = build_logger(cfg, out_dir, *labels) if where.is_main else Logger()  # only rank 0 reports
    meta = checkpoint_meta(cfg, data.vocab.words)
    try:
        fit = trainer.fit(model, data, objects.optimizer, objects.schedule, device, out_dir, logger, meta, on_started)
        with StopSignals() as signals:  # test and generation stop on a signal too (last.pt is already saved)
            model.load_state_dict(load_checkpoint(fit.best_checkpoint, device)["model_state"])
            logger.log_checkpoint(fit.best_checkpoint)
            try:  # a stop signal ends it at the next window; the resumed run (nothing left to train) tests again
                test_loss = trainer.evaluate(
                    model, data.stream("test").to(device), device, stop=signals.agreed, label="test"
                )
            except EvaluationStopped:
                raise TrainingInterrupted(signals.received or signal.SIGTERM, str(fit.last_checkpoint)) from None
            trainer.release_step()  # the step holds DistributedDataParallel, and it the process group
            distributed.leave()  # the collective work is over: every rank leaves the group together
            if not where.is_main:
                return {"status": "completed", "best_val_ppl": perplexity(fit.best_val_loss), "test_loss": test_loss}
            tested_with = _test_with(methods, model, data, device, trainer)
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
            "learned": not no_better_than_uniform(fit.best_val_loss, len(data.vocab)),
            **{f"test_ppl_{name}": scored["ppl"] for name, scored in tested_with.items() if "ppl" in scored},
            "num_params": sum(p.numel() for p in model.parameters()),
            "epochs_run": fit.epochs_run,
            "train_tokens_per_sec": fit.train_tokens_per_sec,
            "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": peak_gpu_mb(device),
            "torch_threads": torch.get_num_threads(),
            "processes": where.world_size,
            "wall_s": time.perf_counter() - started,
        }
        if not results["learned"]:
            results["warning"] = uniform_guess_warning(fit.best_val_loss, len(data.vocab), "at its best")
        if tested_with:
            results["test_with"] = tested_with
        atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
        logger.log_summary(results)
        logger.log_samples(text)
    finally:
        logger.finish()
    return results


def _test_with(methods: dict, model: Any, data: Any, device: torch.device, trainer: Any) -> dict[str, dict[str, Any]]:
    """The run's ``test_with`` methods on the test split (:mod:`lmlab.evaluation.methods`), on the main
    process only: loss, perplexity and the settings each used (a searched lambda, its validation figure)."""

    def stream(split: str, bptt: int | None = None) -> TokenStream:
        return data.eval_stream(getattr(data.corpus, split), bptt).to(device)

    def static_loss(windows: TokenStream) -> float:  # one process: every rank left the group after the test
        return trainer.evaluate(model, windows, device)

    dtype = trainer.autocast_dtype(device)  # the plain test's precision: every method scores the model the same way
    inputs = EvaluationInputs(model, "test", stream, static_loss, vocab=data.vocab, dtype=dtype)
    tested: dict[str, dict[str, Any]] = {}
    for name, (method, settings) in methods.items():
        try:
            scored = method(inputs, **settings)
        except LmlabError as err:  # the plain figures stand: the failure is recorded beside them
            print(f"error: test_with {name} failed: {err}", file=sys.stderr, flush=True)
            tested[name] = {"status": "failed", "error": str(err)}
            continue
        tested[name] = {"loss": scored.loss, "ppl": perplexity(scored.loss), "settings": scored.settings}
    return tested
