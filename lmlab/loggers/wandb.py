"""Weights & Biases behind lmlab's :class:`~lmlab.loggers.base.Logger` interface (``logger=wandb``).

Offline by default (``WANDB_MODE=offline``): files go to ``<run dir>/wandb`` and ``wandb sync`` uploads
them later, so nobody needs an account to train. A failing W&B (no network, bad key, full disk) warns
once and training goes on with the local files. The run id is kept in checkpoints, so a resumed job
re-attaches to the same W&B run instead of starting a second one.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any, Literal

from lmlab.config import flatten
from lmlab.config.schema import PositiveFloat
from lmlab.loggers.base import ServiceLogger, close_quietly, epoch_figures, register_logger


@register_logger("wandb")
class WandbLogger(ServiceLogger):
    """Logs the flattened config, per-step train loss/lr, per-epoch validation figures, test summary,
    generated samples (a table) and optionally the best checkpoint (an artifact)."""

    service = "W&B"

    def __init__(
        self,
        out_dir: str,
        run_config: dict[str, Any],
        project: str = "lmlab",
        entity: str | None = None,
        mode: Literal["offline", "online", "disabled"] = "offline",
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        job_type: str = "train",
        log_checkpoint: bool = False,
        init_timeout_s: PositiveFloat = 30.0,
        quiet: bool = True,
    ) -> None:
        self.out_dir, self.config = Path(out_dir), flatten(run_config)
        self.init_args = {
            "project": project,
            "entity": entity,
            "mode": mode,
            "group": group,
            "name": name,
            "tags": tags or [],
            "job_type": job_type,
        }
        self.log_checkpoint_files = log_checkpoint
        self.init_timeout_s = init_timeout_s
        self.quiet = quiet
        self.run: Any = None
        self.run_id: str | None = None

    @property
    def connected(self) -> bool:
        return self.run is not None

    def _start(self) -> None:
        import wandb

        self.run_id = self.run_id or uuid.uuid4().hex[:12]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            dir=str(self.out_dir),
            config=self.config,
            id=self.run_id,
            resume="allow",
            reinit="finish_previous",
            # quiet: W&B's own lines go to its debug log in <run dir>/wandb, not the console
            settings=wandb.Settings(init_timeout=self.init_timeout_s, silent=self.quiet),
            **self.init_args,
        )
        self._say_where()
        self.run.define_metric("epoch")
        for pattern in ("val/*", "train/epoch_loss", "throughput/*"):
            self.run.define_metric(pattern, step_metric="epoch")

    def _say_where(self) -> None:
        """One line as the run starts: where the W&B run is (offline: its folder and the command that uploads it)."""
        if self.init_args["mode"] == "offline" or getattr(self.run.settings, "_offline", False):
            folder = Path(self.run.dir).parent  # <run dir>/wandb/offline-run-<time>-<id>; files/ is inside it
            print(f"W&B offline run: {folder} (upload it with: wandb sync {folder})", flush=True)
        elif getattr(self.run, "url", None):
            print(f"W&B run: {self.run.url}", flush=True)

    def start(self) -> None:
        self._call("init", lambda: None)  # connects (or gives up after init_timeout_s, once) before timing

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._call("log", lambda: self.run.log({**metrics, "trainer/global_step": step}))

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        row = epoch_figures(metrics)
        self._call("log", lambda: self.run.log(row))

    def log_summary(self, results: dict[str, Any]) -> None:
        def update() -> None:
            for key, value in results.items():
                self.run.summary[key] = value

        self._call("summary", update)

    def log_samples(self, text: str) -> None:
        import wandb

        self._call("samples", lambda: self.run.log({"samples": wandb.Table(columns=["text"], data=[[text]])}))

    def log_checkpoint(self, path: Path) -> None:
        if not self.log_checkpoint_files:
            return
        import wandb

        def upload() -> None:
            artifact = wandb.Artifact(f"model-{self.run_id}", type="model")
            artifact.add_file(str(path))
            self.run.log_artifact(artifact, aliases=["best"])

        self._call("artifact", upload)

    def restore(self, history: list[dict[str, Any]], state: dict[str, Any] | None) -> None:
        """Re-attach to the run id a ``last.pt`` names — only one of the shape lmlab makes: W&B builds a
        folder name from it, so a crafted id must not choose a path."""
        run_id = state.get("run_id") if isinstance(state, dict) else None
        if isinstance(run_id, str) and re.fullmatch(r"[0-9a-z]{1,64}", run_id):
            self.run_id = run_id

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id} if self.run_id else {}

    def finish(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            close_quietly("W&B finish", run.finish)
