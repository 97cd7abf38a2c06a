"""MLflow behind lmlab's :class:`~lmlab.loggers.base.Logger` interface (``logger=mlflow``), on MLflow's own client.

No server and no account: by default the store is a SQLite file beside the runs, the sweep's folder for a
sweep's jobs (one experiment per sweep, one MLflow run per job) or the run's own folder, with artifacts in
``mlartifacts/`` beside it; ``logger.mlflow.tracking_uri=...`` names any other store (a server, a database).
Look at it with MLflow's web UI::

    mlflow ui --backend-store-uri sqlite:///multirun/DAY/TIME/mlflow.db     # then http://127.0.0.1:5000

Params are the run config, flattened (``model.hidden_dim``); metrics are the per-step figures (stepped by the
global training step), the per-epoch validation figures (stepped by the epoch) and the final ones; the best
checkpoint and the generated text are artifacts. A resumed run continues the same MLflow run (its id is kept
in the checkpoints). A failing MLflow warns once and training goes on with the local files.
"""

from __future__ import annotations

import fcntl
import importlib.util
import re
import time
from pathlib import Path
from typing import Any

from lmlab.config import flatten
from lmlab.errors import CheckpointError, ConfigError, printable
from lmlab.loggers.base import ServiceLogger, close_quietly, epoch_figures, register_logger

PARAM_VALUE_LIMIT = 6000  # MLflow refuses longer parameter values
RUN_ID = re.compile(r"[0-9a-f]{32}")


@register_logger("mlflow")
class MlflowLogger(ServiceLogger):
    """Params, per-step and per-epoch metrics, final figures, best checkpoint and samples into an MLflow store."""

    service = "MLflow"

    def __init__(
        self,
        out_dir: str,
        run_config: dict[str, Any],
        group: str | None = None,
        name: str | None = None,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        log_checkpoint: bool = True,
    ) -> None:
        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError("logger=mlflow needs the mlflow package: pip install 'lmlab[mlflow]'")
        self.out_dir = Path(out_dir)
        # A sweep's job (labelled with the sweep, ``group``) lives in a folder of the sweep's: the store goes there.
        self.store_dir = (self.out_dir.parent if group else self.out_dir).resolve()
        self.tracking_uri = tracking_uri or f"sqlite:///{self.store_dir / 'mlflow.db'}"
        self.experiment = experiment or group or "lmlab"
        self.run_name = name or self.out_dir.name
        self.params = flatten(run_config, private=False)
        self.log_checkpoint_file = log_checkpoint
        self.client: Any = None
        self.run_id: str | None = None
        self.finished = False

    @property
    def connected(self) -> bool:
        return self.client is not None

    def _start(self) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.store_dir.mkdir(parents=True, exist_ok=True)
        # A sweep's parallel jobs share one SQLite file: the first creates it (and its tables), one at a time.
        with open(self.store_dir / ".mlflow.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            client = MlflowClient(tracking_uri=self.tracking_uri)
            found = client.get_experiment_by_name(self.experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(
                self.experiment, artifact_location=(self.store_dir / "mlartifacts").as_uri()
            )  # fmt: skip
        if self.run_id is None:  # a new run; a resumed one continues its own
            run = client.create_run(experiment_id, run_name=self.run_name, tags={"lmlab.run_dir": str(self.out_dir)})
            self.run_id = run.info.run_id
            params = [Param(key, str(value)[:PARAM_VALUE_LIMIT]) for key, value in self.params.items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params a call
                client.log_batch(self.run_id, params=params[start : start + 100])
        else:
            client.update_run(self.run_id, status="RUNNING")
        self.client = client
        say = f"MLflow run {self.run_id} in {self.tracking_uri}"
        print(f"{say} (look: mlflow ui --backend-store-uri {self.tracking_uri})", flush=True)

    def _log(self, figures: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in figures.items() if _number(value)]
        if metrics:
            self._call("log", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def start(self) -> None:
        self._call("start", lambda: None)  # connects before training is timed

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._log({key: value for key, value in metrics.items() if key != "epoch"}, step)

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        figures = epoch_figures(metrics)
        self._log({key: value for key, value in figures.items() if key != "epoch"}, metrics["epoch"])

    def log_summary(self, results: dict[str, Any]) -> None:
        keys = ("best_val_ppl", "best_val_loss", "test_ppl", "test_loss", "epochs_run", "train_tokens_per_sec")
        figures = {f"final/{key}": results[key] for key in keys if key in results}
        for method, scored in results.get("test_with", {}).items():
            if "ppl" in scored:
                figures[f"final/test_ppl_{method}"] = scored["ppl"]
        self._log(figures, int(results.get("epochs_run") or 0))
        self.finished = True

    def log_samples(self, text: str) -> None:
        self._call("log_text", lambda: self.client.log_text(self.run_id, text + "\n", "samples.txt"))

    def log_checkpoint(self, path: Path) -> None:
        if self.log_checkpoint_file:
            self._call("log_artifact", lambda: self.client.log_artifact(self.run_id, str(path), "checkpoints"))

    def restore(self, history: list[dict[str, Any]], state: dict[str, Any] | None) -> None:
        run_id = state.get("run_id") if isinstance(state, dict) else None
        if run_id is not None and not (isinstance(run_id, str) and RUN_ID.fullmatch(run_id)):
            raise CheckpointError(
                f"the checkpoint's MLflow run id ({printable(run_id, 40)}) is not an MLflow run id: its logger record "
                "is damaged; resume from another checkpoint, or without logger=mlflow"
            )
        self.run_id = run_id

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id else {}

    def finish(self) -> None:
        if self.client is not None and not self.failed:
            status = "FINISHED" if self.finished else "KILLED"  # stopped or failed: a resume continues it
            close_quietly("MLflow end of run", lambda: self.client.set_terminated(self.run_id, status))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
