"""Where metrics go: the console and ``metrics.jsonl`` always, plus any registered backends chosen with
``logger=wandb``, ``logger=tensorboard`` or several at once, ``logger=[wandb,tensorboard]``.

Every logger has the same small interface (:class:`Logger`); the trainer and runner call it and never
know which backends are behind it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmlab.errors import CheckpointError, printable
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


class ServiceLogger(Logger):
    """A backend that talks to a service (W&B, MLflow) and must never stop training: :meth:`_call` connects on first
    use (:meth:`_start`, once :attr:`connected` is false) and runs an action; the first failure warns once and
    the backend goes quiet for the rest of the run, the run's own files being complete without it."""

    service = "the service"  # its name in the warning
    failed = False

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    def _start(self) -> None:
        raise NotImplementedError

    def _call(self, what: str, action: Callable[[], Any]) -> None:
        if self.failed:
            return
        try:
            if not self.connected:
                self._start()
            action()
        except Exception as err:  # a service must never take training down with it
            self.failed = True
            warnings.warn(
                f"{self.service} {what} failed ({type(err).__name__}: {printable(str(err), 300)}); "
                "continuing with local files only",
                RuntimeWarning,
                stacklevel=3,
            )


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


def epoch_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """An epoch's figures under the names every dashboard backend uses (W&B, TensorBoard): one scheme,
    so runs compare the same way in either."""
    return {
        "epoch": metrics["epoch"],
        "val/loss": metrics["val_loss"],
        "val/ppl": metrics["val_ppl"],
        "train/epoch_loss": metrics["train_loss"],
        "throughput/tokens_per_sec": metrics["tokens_per_sec"],
    }


# The per-step figures the progress hook reports (under the dashboards' names) -> their names in a run's files
STEP_FIELDS = {
    "epoch": "epoch",
    "train/loss": "loss",
    "train/ppl": "ppl",
    "lr": "lr",
    "throughput/tokens_per_sec": "tokens_per_sec",
}


def restored_step(state: dict[str, Any] | None, key: str, record: str, without: str) -> int | None:
    """The global step a backend's record in a checkpoint names under ``key`` (None: the record has none, as in a
    checkpoint older than that backend's use of it). A value that is no step count is a damaged checkpoint: one
    line naming ``record`` (the checkpoint's "TensorBoard step") and how to go on (``without``)."""
    step = state.get(key) if isinstance(state, dict) else None
    if step is not None and not (isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 2**62):
        raise CheckpointError(
            f"the checkpoint's {record} ({printable(step, 40)}) is not a step count: its logger record is damaged; "
            f"resume from another checkpoint{without}"
        )
    return step


def close_quietly(what: str, close: Callable[[], object]) -> None:
    """A backend's last call: a failure warns (the run's own files are complete) and never raises."""
    try:
        close()
    except Exception as err:
        warnings.warn(f"{what} failed ({err}); the run's local files are complete", RuntimeWarning, stacklevel=3)


LOGGERS = Registry("logger", "logger", Logger)
register_logger = LOGGERS.register  # class decorator: make a backend selectable as logger=<name>
