"""Progress reports of the training loop: a bar on a terminal, plain lines elsewhere (a :class:`Hook`)."""

from __future__ import annotations

import math
import time
from typing import Any

from tqdm.auto import tqdm

from lmlab.config.schema import PositiveFloat, PositiveInt
from lmlab.metrics import perplexity
from lmlab.runtime import distributed
from lmlab.training.hooks.base import FitContext, Hook


class Progress(Hook):
    """Progress every ``log_interval`` steps: a bar on a terminal (``bar`` null) or when asked
    (true); otherwise — output redirected, as on a cluster — a plain line with step, ms/step, tokens/s,
    loss, perplexity, lr and the epoch's ETA. The plain line also comes by the clock: ``first_line_s`` after an
    epoch's first step, then at most ``every_s`` after the last line, whichever comes first, so that a slow model
    talks from its first seconds. The logger gets the figures on the step grid only (``log_step``: the run's
    ``steps.jsonl`` and any dashboard, the same steps whatever the machine's speed, so that a resumed run's
    curve is the uninterrupted one), and the epoch's metrics at its end."""

    def __init__(
        self,
        log_interval: PositiveInt = 200,
        bar: bool | None = None,
        first_line_s: PositiveFloat | None = 10.0,
        every_s: PositiveFloat | None = 30.0,
    ) -> None:
        self.log_interval, self.show_bar = log_interval, bar
        self.first_line_s, self.every_s = first_line_s, every_s
        self.bar: Any = None

    def on_epoch_start(self, ctx: FitContext) -> None:
        disable = None if self.show_bar is None else not self.show_bar
        disable = disable if distributed.place().is_main else True
        self.bar = tqdm(
            total=ctx.num_windows, initial=ctx.state.step, desc=f"epoch {ctx.state.epoch}", leave=False,
            disable=disable, dynamic_ncols=True,
        )  # fmt: skip
        self.grid = _Window()  # what the next log_step averages over
        self.line = _Window()  # what the next plain line averages over
        self.next_line_at: float | None = None  # set at the epoch's first step

    def on_step_end(self, ctx: FitContext) -> None:
        self.bar.update(1)
        now = time.perf_counter()
        for window in (self.grid, self.line):
            window.add(ctx.tokens_this_step)
        if self.next_line_at is None:
            self.next_line_at = now + (self.first_line_s or math.inf)
        step = ctx.state.step
        on_grid = step % self.log_interval == 0
        record_due = on_grid or step == ctx.num_windows  # steps.jsonl's grid, and each epoch's last step
        line_due = self.bar.disable and (on_grid or (now >= self.next_line_at and step != ctx.num_windows))
        if not (record_due or line_due):
            return
        running = ctx.running_loss()  # one read of the loss (a host sync on a GPU) for the record and the line
        if record_due:
            self.bar.set_postfix(loss=f"{running:.3f}")
            ctx.logger.log_step(
                ctx.state.global_step,
                {
                    "epoch": ctx.state.epoch, "train/loss": running, "train/ppl": perplexity(running), "lr": ctx.lr,
                    "throughput/tokens_per_sec": self.grid.speed(now),
                },
            )  # fmt: skip
            self.grid = _Window()
        if line_due:
            seconds = now - self.line.since
            ctx.logger.log_progress(
                {
                    "epoch": ctx.state.epoch, "step": step, "steps": ctx.num_windows, "loss": running,
                    "ms_per_step": 1000 * seconds / self.line.steps, "tokens_per_sec": self.line.speed(now),
                    "lr": ctx.lr, "eta_s": seconds / self.line.steps * (ctx.num_windows - step),
                }
            )  # fmt: skip
            self.line = _Window()
            self.next_line_at = now + (self.every_s or math.inf)

    def on_epoch_end(self, ctx: FitContext, metrics: dict[str, Any]) -> None:
        self.bar.close()
        ctx.logger.log_epoch(metrics)

    def on_fit_end(self, ctx: FitContext) -> None:
        if self.bar is not None:
            self.bar.close()


class _Window:
    """Steps and tokens since a moment: the figures one report averages over."""

    def __init__(self) -> None:
        self.since, self.steps, self.tokens = time.perf_counter(), 0, 0

    def add(self, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens

    def speed(self, now: float) -> float:
        return self.tokens / (now - self.since) if now > self.since else 0.0
