"""The logger every run has: lines for people on the console and in ``run.log``, one JSON object per epoch in
``metrics.jsonl`` and one per progress report in ``steps.jsonl`` (the training curve; schema in docs/outputs.md).

Both files are the checkpoint's view of the run: a resumed run rewrites them (atomically) to what its
checkpoint had seen, then appends, so no epoch or step is lost or written twice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmlab.loggers.base import STEP_FIELDS, Logger, restored_step
from lmlab.metrics import format_ppl, perplexity
from lmlab.runtime.files import atomic_write_text, open_append
from lmlab.runtime.pass_progress import duration


class ConsoleLogger(Logger):
    """Lines for people on stdout (which :mod:`lmlab.runtime.run_log` copies into ``run.log``); one JSON object
    per epoch in ``metrics.jsonl``, one per progress report in ``steps.jsonl``. ``prefix`` marks a multirun
    job's lines (``[job 3] ``)."""

    def __init__(self, out_dir: str | Path, prefix: str = "") -> None:
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.path = self.out_dir / "metrics.jsonl"
        self.steps_path = self.out_dir / "steps.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.last_step = 0  # the global step of the last line in steps.jsonl
        self._finished = False

    def say(self, line: str) -> None:
        print(f"{self.prefix}{line}", flush=True)  # and into run.log: lmlab.runtime.run_log copies every console line

    def log_progress(self, p: dict[str, float]) -> None:
        self.say(
            f"epoch {p['epoch']} | step {p['step']:,}/{p['steps']:,} | {p['ms_per_step']:.1f} ms/step | "
            f"{p['tokens_per_sec']:,.0f} tok/s | loss {format_ppl(p['loss'])} | "
            f"ppl {format_ppl(perplexity(p['loss']))} | lr {p['lr']:g} | ETA {duration(p['eta_s'])}"
        )

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{STEP_FIELDS[key]: value for key, value in metrics.items() if key in STEP_FIELDS}}
        with open_append(self.steps_path) as f:
            f.write(json.dumps(record) + "\n")
        self.last_step = step

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        self.say(format_epoch(metrics))
        if metrics.get("warning"):
            self.say(metrics["warning"])
        with open_append(self.path) as f:
            f.write(json.dumps(metrics) + "\n")

    def restore(self, history: list[dict[str, Any]], state: dict[str, Any] | None) -> None:
        # The checkpoint is the truth: epochs and steps logged after it was written are dropped, none are lost.
        atomic_write_text(self.path, "".join(json.dumps(m) + "\n" for m in history))
        last = restored_step(state, "last_step", "last logged step", "")
        if last is None:  # a checkpoint from before steps.jsonl: the file stays as it is
            return
        self.last_step = last
        kept = [line for line in _lines(self.steps_path) if _step_of(line) <= last]
        atomic_write_text(self.steps_path, "".join(kept))

    def state(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def log_summary(self, results: dict[str, Any]) -> None:
        self.say(f"test-loss: {results['test_loss']:.2f} | test-pp: {format_ppl(results['test_ppl'])}")
        for name, scored in results.get("test_with", {}).items():
            if "ppl" not in scored:  # failed: its error line went to stderr
                continue
            self.say(f"test-loss: {scored['loss']:.2f} | test-pp: {format_ppl(scored['ppl'])} ({name})")
        if results.get("warning"):
            self.say(results["warning"])
        self._finished = True

    def log_samples(self, text: str) -> None:
        self.say(f"Generated: {text}")

    def finish(self) -> None:
        if self._finished:  # where everything went (a refused run says nothing, and writes nothing here)
            self.say(f"run folder: {self.out_dir}")
            self.say(f"best checkpoint: {self.out_dir / 'checkpoints' / 'best.pt'}")
            self.say(f"results: {self.out_dir / 'results.json'}")


def _lines(path: Path) -> list[str]:
    """The complete lines of a JSON-lines file (a line cut short by a kill has no newline and is dropped)."""
    if not path.is_file():
        return []
    return [line + "\n" for line in path.read_text(errors="replace").split("\n")[:-1]]


def _step_of(line: str) -> float:
    """A steps.jsonl line's step; a line that is not one of ours sorts after every step (and is dropped)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return float("inf")
    return step if isinstance(step, int) and not isinstance(step, bool) else float("inf")


def format_epoch(m: dict[str, Any]) -> str:
    train = "-" if m["train_loss"] is None else format_ppl(m["train_loss"])
    return (
        f"[Epoch: {m['epoch']}] train-loss: {train} | val-loss: {format_ppl(m['val_loss'])} | "
        f"val-pp: {format_ppl(m['val_ppl'])} | lr {m['lr']:g} | {m['tokens_per_sec']:,.0f} tok/s | "
        f"{m['elapsed_s']:.0f} s"
    )
