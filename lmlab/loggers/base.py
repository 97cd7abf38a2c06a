"""Where metrics go: the console and ``metrics.jsonl`` always, plus any registered backends chosen with
``logger=wandb``, ``logger=tensorboard`` or several at once, ``logger=[wandb,tensorboard]``.

Every logger has the same small interface (:class:`Logger`); the trainer and runner call it and never
know which backends are behind it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from lmlab.registry import Registry


class Logger:
    """The interface; the base class ignores everything, so a backend overrides only what it needs.

    A backend is registered under a name (``@register_logger("mine")``) and configured by the node
    ``logger.<name>`` (``conf/logger/<name>.yaml`` holds ``<name>: {options}``). It is built as
    ``cls(out_dir=..., run_config=..., group=..., name=..., **options)``: the run folder, the resolved run
    config (a plain dict), and labels for the job (a multirun's folder, the job's overrides; None for a
    single run, unless the options set them). Options are checked against the constructor's annotations
    before any work starts. A backend must never stop training: it warns once and goes quiet on failure.
    """

    def start(self) -> None:
        """Connect or open what the backend needs; called before training is timed."""

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_progress(self, progress: dict[str, float]) -> None:
        """A progress report (step, ms/step, tokens/s, loss, lr, ETA) where no progress bar is shown."""

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        pass

    def log_summary(self, results: dict[str, Any]) -> None:
        pass

    def log_samples(self, text: str) -> None:
        pass

    def log_checkpoint(self, path: Path) -> None:
        pass

    def restore(self, history: list[dict[str, Any]], state: dict[str, Any] | None) -> None:
        """Called on resume with the epochs already done and what :meth:`state` returned then."""

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue this logger (stored in checkpoints)."""
        return {}

    def finish(self) -> None:
        pass


class ConsoleLogger(Logger):
    """Lines for people on stdout, each also appended to the run folder's ``run.log``; one JSON object
    per epoch in ``metrics.jsonl``. ``prefix`` marks a multirun job's lines (``[job 3] ``)."""

    def __init__(self, out_dir: str | Path, prefix: str = "") -> None:
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.path = self.out_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._finished = False

    def say(self, line: str) -> None:
        print(f"{self.prefix}{line}", flush=True)
        with (self.out_dir / "run.log").open("a") as f:  # Hydra's job log appends there too
            f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")

    def log_progress(self, p: dict[str, float]) -> None:
        self.say(
            f"epoch {p['epoch']} | step {p['step']:,}/{p['steps']:,} | {p['ms_per_step']:.1f} ms/step | "
            f"{p['tokens_per_sec']:,.0f} tok/s | loss {format_ppl(p['loss'])} | "
            f"ppl {format_ppl(perplexity(p['loss']))} | lr {p['lr']:g} | ETA {_duration(p['eta_s'])}"
        )

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        self.say(format_epoch(metrics))
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")

    def restore(self, history: list[dict[str, Any]], state: dict[str, Any] | None) -> None:
        # The checkpoint is the truth: epochs logged after it was written are dropped, none are lost.
        self.path.write_text("".join(json.dumps(m) + "\n" for m in history))

    def log_summary(self, results: dict[str, Any]) -> None:
        self.say(f"test-loss: {results['test_loss']:.2f} | test-pp: {format_ppl(results['test_ppl'])}")
        self._finished = True

    def log_samples(self, text: str) -> None:
        self.say(f"Generated: {text}")

    def finish(self) -> None:
        if self._finished:  # where everything went (a refused run says nothing, and writes nothing here)
            self.say(f"run folder: {self.out_dir}")
            self.say(f"best checkpoint: {self.out_dir / 'checkpoints' / 'best.pt'}")
            self.say(f"results: {self.out_dir / 'results.json'}")


class MultiLogger(Logger):
    """Fans every call out to several loggers."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.loggers = loggers

    def start(self) -> None:
        for logger in self.loggers:
            logger.start()

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_step(step, metrics)

    def log_progress(self, progress: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_progress(progress)

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_epoch(metrics)

    def log_summary(self, results: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_summary(results)

    def log_samples(self, text: str) -> None:
        for logger in self.loggers:
            logger.log_samples(text)

    def log_checkpoint(self, path: Path) -> None:
        for logger in self.loggers:
            logger.log_checkpoint(path)

    def restore(self, history: list[dict[str, Any]], state: dict[str, Any] | None) -> None:
        for i, logger in enumerate(self.loggers):
            logger.restore(history, (state or {}).get(str(i)))

    def state(self) -> dict[str, Any]:
        return {str(i): logger.state() for i, logger in enumerate(self.loggers)}

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()


def format_epoch(m: dict[str, Any]) -> str:
    train = "-" if m["train_loss"] is None else format_ppl(m["train_loss"])
    return (
        f"[Epoch: {m['epoch']}] train-loss: {train} | val-loss: {format_ppl(m['val_loss'])} | "
        f"val-pp: {format_ppl(m['val_ppl'])} | lr {m['lr']:g} | {m['tokens_per_sec']:,.0f} tok/s | "
        f"{m['elapsed_s']:.0f} s"
    )


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows past ~709; such a model is diverged anyway


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_ppl(value: float) -> str:
    """A loss or perplexity for people: 2 decimals up to a million, then scientific (a diverged 1.01e+304)."""
    return f"{value:.2f}" if value < 1e6 else f"{value:.3g}"


LOGGERS = Registry("logger", "logger", Logger)
register_logger = LOGGERS.register  # class decorator: make a backend selectable as logger=<name>
