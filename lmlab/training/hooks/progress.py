"""Progress reports of the training loop: a bar on a terminal, plain lines elsewhere (a :class:`Hook`)."""

from __future__ import annotations

import time
from typing import Any

from tqdm.auto import tqdm

from lmlab.config.schema import PositiveInt
from lmlab.metrics import perplexity
from lmlab.runtime import distributed
from lmlab.training.hooks.base import FitContext, Hook


class Progress(Hook):
    """Progress every ``log_interval`` steps: a bar on a terminal (``bar`` null) or when asked
    (true); otherwise — output redirected, as on a cluster — a plain line with step, ms/step, tokens/s,
    loss, perplexity, lr and the epoch's ETA. The same figures go to the logger either way (``log_step``: the
    run's ``steps.jsonl`` and any dashboard), and the epoch's metrics at its end."""

    def __init__(self, log_interval: PositiveInt = 200, bar: bool | None = None) -> None:
        self.log_interval, self.show_bar = log_interval, bar
        self.bar: Any = None

    def on_epoch_start(self, ctx: FitContext) -> None:
        disable = None if self.show_bar is None else not self.show_bar
        disable = disable if distributed.place().is_main else True
        self.bar = tqdm(
            total=ctx.num_windows, initial=ctx.state.step, desc=f"epoch {ctx.state.epoch}", leave=False,
            disable=disable, dynamic_ncols=True,
        )  # fmt: skip
        self._start_report()

    def _start_report(self) -> None:
        """What the next plain progress line averages over starts now."""
        self.since = time.perf_counter()
        self.steps_since = 0
        self.tokens_since = 0

    def on_step_end(self, ctx: FitContext) -> None:
        self.bar.update(1)
        self.steps_since += 1
        self.tokens_since += ctx.tokens_this_step
        step = ctx.state.step
        if step % self.log_interval and step != ctx.num_windows:
            return
        running, seconds = ctx.running_loss(), time.perf_counter() - self.since
        speed = self.tokens_since / seconds if seconds > 0 else 0.0
        self.bar.set_postfix(loss=f"{running:.3f}")
        ctx.logger.log_step(
            ctx.state.global_step,
            {
                "epoch": ctx.state.epoch, "train/loss": running, "train/ppl": perplexity(running), "lr": ctx.lr,
                "throughput/tokens_per_sec": speed,
            },
        )  # fmt: skip
        if self.bar.disable and step % self.log_interval == 0:
            ctx.logger.log_progress(
                {
                    "epoch": ctx.state.epoch, "step": step, "steps": ctx.num_windows, "loss": running,
                    "ms_per_step": 1000 * seconds / self.steps_since, "tokens_per_sec": speed,
                    "lr": ctx.lr, "eta_s": seconds / self.steps_since * (ctx.num_windows - step),
                }
            )  # fmt: skip
        self._start_report()

    def on_epoch_end(self, ctx: FitContext, metrics: dict[str, Any]) -> None:
        self.bar.close()
        ctx.logger.log_epoch(metrics)

    def on_fit_end(self, ctx: FitContext) -> None:
        if self.bar is not None:
            self.bar.close()
