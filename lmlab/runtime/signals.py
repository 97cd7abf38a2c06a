"""Graceful stop on SIGINT/SIGTERM: the training loop finishes its step, saves, then stops.

A second Ctrl-C restores Python's default behaviour and interrupts at once. In a SLURM job started by
submitit (``hydra/launcher=slurm``) SIGUSR2 — submitit's "time is nearly up / pre-empted" signal — is a
stop signal too: the loop saves ``last.pt`` first, then :meth:`TrainingInterrupted.hand_on` gives the
signal to submitit's own handler, which requeues the job (it resumes from that ``last.pt``).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from lmlab.runtime.launch import under_submitit


def stop_signals() -> tuple[int, ...]:
    """The signals that stop training after a save."""
    requeue = (signal.SIGUSR2,) if under_submitit() else ()
    return (signal.SIGINT, signal.SIGTERM, *requeue)


class TrainingInterrupted(Exception):
    """Raised by the trainer after it saved ``last.pt`` because a stop signal arrived."""

    def __init__(self, signum: int, checkpoint: str) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name}; state saved to {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # shell convention: 130 for SIGINT, 143 for SIGTERM

    def hand_on(self) -> None:
        """Once the state is saved, give a SIGUSR2 to the handler that was there before training (submitit's,
        which requeues the job and exits); other signals end here."""
        if self.signum == signal.SIGUSR2:
            handler = signal.getsignal(signal.SIGUSR2)
            if callable(handler):
                handler(signal.SIGUSR2, None)


class StopSignals:
    """Context manager that records SIGINT/SIGTERM instead of dying mid-step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user wants out now
        self.received = signum
        if signum == signal.SIGINT:
            print("\nCtrl-C: finishing this step and saving a checkpoint (press again to quit at once)", flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            for signum in stop_signals():
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def agreed(self) -> bool:
        """Whether a stop signal reached this process or, under several processes, any rank."""
        from lmlab.runtime import distributed  # torch.distributed: only where a signal is polled

        return distributed.agree_max(float(self.received or 0)) > 0

    def raise_if_received(self, checkpoint: object) -> None:
        """Stop now if a signal arrived (outside the training loop, where there is nothing left to save)."""
        if self.received is not None:
            raise TrainingInterrupted(self.received, str(checkpoint))

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
