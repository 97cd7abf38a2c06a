"""TensorBoard behind lmlab's :class:`~lmlab.loggers.base.Logger` interface (``logger=tensorboard``).

Event files go to ``<run dir>/tensorboard``; ``tensorboard --logdir multirun/DAY/TIME`` then compares a
sweep's jobs side by side (each under its own folder name), ``--logdir outputs`` every run. Scalars share
one step axis, the global training step, so that a resumed run drops (``purge_step``) what was logged
after its checkpoint instead of drawing it twice. Needs the ``tensorboard`` package.

At its end a run also writes its hyperparameters (:func:`hyperparameters`: the config's model, optimizer,
scheduler, dataset and trainer values, flattened to dotted keys, and the seed) with its final figures
(:data:`HPARAM_METRICS`) through TensorBoard's HParams plugin: the HParams dashboard of a sweep's folder
then holds one row per job (table, parallel coordinates, scatter matrix).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

from lmlab.config import flatten
from lmlab.config.schema import PositiveInt
from lmlab.errors import ConfigError
from lmlab.loggers.base import Logger, close_quietly, epoch_figures, register_logger, restored_step

# The figures a run reports to the HParams dashboard (each also written as a scalar of that name).
HPARAM_METRICS = {
    "hparams/best_val_ppl": "best_val_ppl",
    "hparams/test_ppl": "test_ppl",
    "hparams/epochs_run": "epochs_run",
}
HPARAM_GROUPS = ("model", "optimizer", "scheduler", "dataset", "trainer")


def hyperparameters(run_config: dict[str, Any]) -> dict[str, float | int | str | bool]:
    """The run's settings as HParams wants them: dotted keys (``model.hidden_dim``), numbers, strings or
    booleans (a list or null as its text); constructor targets (``_target_``) left out."""
    flat: dict[str, Any] = {}
    for group in HPARAM_GROUPS:
        if isinstance(run_config.get(group), dict):
            for key, value in flatten(run_config[group], f"{group}.", private=False).items():
                flat[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)
    if run_config.get("seed") is not None:
        flat["seed"] = run_config["seed"]
    return flat


@register_logger("tensorboard")
class TensorBoardLogger(Logger):
    """Per-step train loss and lr, per-epoch validation figures and speed, the test figures, the run
    config and the generated sample (as text)."""

    def __init__(
        self,
        out_dir: str,
        run_config: dict[str, Any],
        group: str | None = None,
        name: str | None = None,
        flush_secs: PositiveInt = 30,
    ) -> None:
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("logger=tensorboard needs the tensorboard package: pip install tensorboard")
        self.log_dir = Path(out_dir) / "tensorboard"
        self.run_config = run_config
        self.flush_secs = flush_secs
        self.labels = {"group": group, "name": name}
        self.writer: Any = None
        self.step = 0  # the last global step logged
        self.purge_step: int | None = None
        self.failed = False

    def _write(self, action: Any) -> None:
        if self.failed or self.writer is None:
            return
        try:
            action(self.writer)
        except Exception as err:  # a full disk must not take training down with it
            self.failed = True
            warnings.warn(f"TensorBoard write failed ({err}); continuing without it", RuntimeWarning, stacklevel=3)

    def start(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step, flush_secs=self.flush_secs)
        if self.purge_step is None:  # a new run: its config once, as text
            config = json.dumps({**self.labels, **self.run_config}, indent=2, default=str)
            self._write(lambda w: w.add_text("config", f"```\n{config}\n```", 0))

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        self._write(lambda w: [w.add_scalar(key, value, step) for key, value in metrics.items()])

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        rows = {key: value for key, value in epoch_figures(metrics).items() if value is not None}
        self._write(lambda w: [w.add_scalar(key, value, self.step) for key, value in rows.items()])

    def log_summary(self, results: dict[str, Any]) -> None:
        figures = {f"test/{key[5:]}": results[key] for key in ("test_loss", "test_ppl") if key in results}
        for name, scored in results.get("test_with", {}).items():
            if "ppl" not in scored:  # a method that failed has no figures
                continue
            figures.update({f"test_{name}/loss": scored["loss"], f"test_{name}/ppl": scored["ppl"]})
        self._write(lambda w: [w.add_scalar(key, value, self.step) for key, value in figures.items()])
        self._write(lambda w: self._write_hparams(w, results))

    def _write_hparams(self, writer: Any, results: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        finals = {tag: float(results[key]) for tag, key in HPARAM_METRICS.items() if results.get(key) is not None}
        experiment, session_start, session_end = hparams(hyperparameters(self.run_config), finals)
        for summary in (experiment, session_start, session_end):
            writer.file_writer.add_summary(summary)
        for tag, value in finals.items():
            writer.add_scalar(tag, value, self.step)

    def log_samples(self, text: str) -> None:
        self._write(lambda w: w.add_text("samples", text, self.step))

    def restore(self, history: list[dict[str, Any]], state: dict[str, Any] | None) -> None:
        step = restored_step(state, "step", "TensorBoard step", ", or without logger=tensorboard")
        if step is not None:
            self.step, self.purge_step = step, step + 1  # events past the checkpoint are dropped

    def state(self) -> dict[str, Any]:
        return {"step": self.step}

    def finish(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            close_quietly("TensorBoard close", writer.close)
