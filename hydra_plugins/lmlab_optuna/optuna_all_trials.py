"""``+sweep=optuna``'s sweeper: hydra-optuna-sweeper's, with ``max_failure_rate`` counted over all trials.

The plugin applies ``max_failure_rate`` to each batch of ``n_jobs`` trials, so with one trial per batch
(trials run one after another) the first failed trial ended the whole study. Here the share is of
``n_trials``: a failed trial is recorded (by lmlab in its folder, by Optuna as FAIL) and the study goes
on, stopping only once more than ``max_failure_rate × n_trials`` trials have failed.

It lives in ``hydra_plugins`` because Hydra instantiates sweepers only from there; optuna and the
plugin are imported when a sweep starts, not when Hydra scans for plugins.
"""

from __future__ import annotations

from typing import Any

from hydra.core.utils import JobStatus
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper


class TooManyFailedTrials(CompactHydraException):
    """More trials failed than ``hydra.sweeper.max_failure_rate`` allows; their folders say why."""


class _CountingLauncher:
    """The sweep's launcher, counting failed jobs over every batch and stopping past the budget."""

    def __init__(self, launcher: Any, n_trials: int, max_failure_rate: float) -> None:
        self.launcher, self.n_trials, self.max_failure_rate = launcher, n_trials, max_failure_rate
        self.failed = 0

    def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
        returns = self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        self.failed += sum(r.status == JobStatus.FAILED for r in returns)
        if self.failed > self.max_failure_rate * self.n_trials:
            raise TooManyFailedTrials(
                f"{self.failed} of {self.n_trials} trials failed, more than hydra.sweeper.max_failure_rate="
                f"{self.max_failure_rate} allows; the study stops (each failed job's folder has its error.txt)"
            )
        return returns

    def __getattr__(self, name: str) -> Any:
        return getattr(self.launcher, name)


class OptunaAllTrialsSweeper(Sweeper):
    """Takes the settings of hydra-optuna-sweeper's ``OptunaSweeper`` (``hydra/sweeper=optuna``)."""

    def __init__(self, max_failure_rate: float, n_trials: int, **settings: Any) -> None:
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

        # The plugin's own per-batch rule is switched off (a batch fails only if all of it failed, never
        # more than 1.0); the share over all trials is enforced by the counting launcher.
        self.optuna = OptunaSweeper(max_failure_rate=1.0, n_trials=n_trials, **settings)
        self.max_failure_rate, self.n_trials = max_failure_rate, n_trials

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        self.optuna.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        impl = self.optuna.sweeper
        impl.launcher = _CountingLauncher(impl.launcher, self.n_trials, self.max_failure_rate)

    def sweep(self, arguments: list[str]) -> Any:
        try:
            return self.optuna.sweep(arguments)
        except ValueError as err:
            if "No trials are completed" in str(err):  # Optuna's best_trial when every trial failed
                raise TooManyFailedTrials("every trial failed; each failed job's folder has its error.txt") from None
            raise
