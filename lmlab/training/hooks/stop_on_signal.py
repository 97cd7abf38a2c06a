"""``hooks.stop_on_signal``: SIGINT/SIGTERM finish the step; the checkpoint hook saves, then the loop stops."""

from __future__ import annotations

from typing import Any

from lmlab.runtime import distributed
from lmlab.runtime.signals import StopSignals
from lmlab.training.hooks.base import FitContext, Hook


class StopOnSignal(Hook):
    """SIGINT/SIGTERM finish the current step; the checkpoint hook then saves and the loop stops. Under
    several processes a signal that reached any rank stops every rank after the same step."""

    def on_fit_start(self, ctx: FitContext) -> None:
        self.signals = StopSignals().__enter__()
        ctx.poll_interrupt = self._agreed  # validation stops at its next window too

    def on_step_end(self, ctx: FitContext) -> None:
        ctx.interrupt = self._agreed()

    def on_epoch_end(self, ctx: FitContext, metrics: dict[str, Any]) -> None:
        ctx.interrupt = self._agreed()  # one after validation's last window: last.pt is saved next, then stop

    def _agreed(self) -> int | None:
        return int(distributed.agree_max(self.signals.received or 0)) or None

    def on_fit_end(self, ctx: FitContext) -> None:
        self.signals.__exit__()
