"""Runs survive interruption, faults and bad input, and lose nothing."""

import csv
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmlab.errors import CheckpointError, DiskFull, NonFiniteLoss
from lmlab.job import train_and_report
from lmlab.runtime.files import atomic_save
from lmlab.training.checkpoint_format import load_checkpoint, model_from_checkpoint
from lmlab.training.step import EagerStep
from tests.conftest import TINY, USER_DIR, write_corpus

ROOT = Path(__file__).resolve().parents[2]
TIMING = {"tokens_per_sec", "elapsed_s", "train_tokens_per_sec", "peak_rss_mb", "wall_s"}


def _without_timing(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in TIMING}


def _stop_at_step(monkeypatch, step: int, signum: int = signal.SIGTERM) -> None:
    """Deliver a real signal to this process right after training step ``step``."""
    original = EagerStep.update
    calls = {"n": 0}

    def stepping(self, *args):
        original(self, *args)
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(EagerStep, "update", stepping)


# The pointer's window rides in the state too, beside an RNN's hidden state or a Transformer's KV cache.
RESUMED_MODELS = {
    "lstm": [*TINY, "model=lstm"],
    "pointer_lstm": [*TINY, "model=pointer_lstm"],
    "pointer_transformer": [
        *(o for o in TINY if not o.startswith("model.")), "model=pointer_transformer", "optimizer=sgd",
        "model.d_model=16",
        "model.num_heads=2", "model.num_layers=1", "model.context=12", "model.pointer_window=20",
    ],
}  # fmt: skip


@pytest.mark.parametrize("model", RESUMED_MODELS)
def test_resumed_run_ends_exactly_like_an_uninterrupted_one(model, corpus_dir, tmp_path, compose_cfg, monkeypatch):
    overrides = [*RESUMED_MODELS[model], f"dataset.path={corpus_dir}", "model.dropout=0.3", "trainer.epochs=3"]
    straight = train_and_report(compose_cfg(overrides), tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        _stop_at_step(patch, 100)  # mid-epoch 2 (88 steps per epoch)
        with pytest.raises(Exception) as stop:
            train_and_report(compose_cfg(overrides), interrupted)
    assert type(stop.value).__name__ == "TrainingInterrupted" and stop.value.exit_code == 143
    saved = load_checkpoint(interrupted / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["step"]) == (2, 12)

    resumed = train_and_report(compose_cfg(overrides), interrupted)  # hooks.checkpoint.resume=auto
    assert _without_timing(resumed) == _without_timing(straight)
    lines = [(interrupted / "metrics.jsonl"), (tmp_path / "straight" / "metrics.jsonl")]
    a, b = ([_without_timing(json.loads(x)) for x in p.read_text().splitlines()] for p in lines)
    assert a == b  # every epoch's figures, none lost or doubled


def _steps(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in record.items() if k != "tokens_per_sec"} for record in records]


def test_the_training_curve_survives_a_crash_and_resume_without_lost_or_doubled_steps(
    corpus_dir, tmp_path, compose_cfg, monkeypatch
):
    """steps.jsonl is the checkpoint's view of the run: steps logged after the last checkpoint (a crash lost
    them from the weights) are dropped on resume and logged again, once."""
    overrides = [*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=2", "hooks.progress.log_interval=10",
                 "hooks.checkpoint.save_every_steps=40", "logger=csv"]  # fmt: skip
    train_and_report(compose_cfg(overrides), tmp_path / "straight")
    straight = _steps(tmp_path / "straight" / "steps.jsonl")
    assert [r["step"] for r in straight] == [*range(10, 81, 10), 88, *range(98, 169, 10), 176]  # 88 steps an epoch
    assert set(straight[0]) == {"step", "epoch", "loss", "ppl", "lr"}

    crashed = tmp_path / "crashed"
    original, calls = EagerStep.update, {"n": 0}

    def crash_at_step_130(self, *args):
        original(self, *args)
        calls["n"] += 1
        if calls["n"] == 130:  # the last checkpoint is step 120's (40 steps each; 88 an epoch, then 32)
            raise RuntimeError("power cut")

    with monkeypatch.context() as patch:
        patch.setattr(EagerStep, "update", crash_at_step_130)
        with pytest.raises(RuntimeError, match="power cut"):
            train_and_report(compose_cfg(overrides), crashed)
    logged = [r["step"] for r in _steps(crashed / "steps.jsonl")]
    assert logged[-1] == 128 and 118 in logged  # 128 was logged after the checkpoint at 120
    assert load_checkpoint(crashed / "checkpoints" / "last.pt")["global_step"] == 120

    train_and_report(compose_cfg(overrides), crashed)  # hooks.checkpoint.resume=auto
    assert _steps(crashed / "steps.jsonl") == straight
    assert _csv_rows(crashed / "metrics.csv") == _csv_rows(tmp_path / "straight" / "metrics.csv")  # logger=csv too


def _csv_rows(path: Path) -> list[dict]:
    timing = {"tokens_per_sec", "elapsed_s"}
    rows = list(csv.DictReader(path.read_text().splitlines()))
    assert {r["kind"] for r in rows} == {"step", "epoch"}
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def test_a_run_with_an_lr_schedule_resumes_on_its_curve(corpus_dir, tmp_path, compose_cfg, monkeypatch):
    schedule = ["hooks=warmup_decay", "scheduler=null", "hooks.lr_schedule.warmup_steps=10",
                "hooks.lr_schedule.total_steps=176", "hooks.lr_schedule.final_lr_ratio=0.1"]  # fmt: skip
    overrides = [*TINY, f"dataset.path={corpus_dir}", "model.dropout=0.3", "trainer.epochs=2", *schedule]
    straight = train_and_report(compose_cfg(overrides), tmp_path / "straight")
    with monkeypatch.context() as patch:
        _stop_at_step(patch, 100)  # mid-epoch 2, on the decay
        with pytest.raises(Exception, match="stopped by SIGTERM"):
            train_and_report(compose_cfg(overrides), tmp_path / "resumed")
    resumed = train_and_report(compose_cfg(overrides), tmp_path / "resumed")
    assert _without_timing(resumed) == _without_timing(straight)
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 88 / 176))))
    assert lrs[1] == pytest.approx(5 * 0.1)  # TINY: lr 5; the floor at the horizon


def test_a_run_with_weight_averaging_resumes_its_mean_exactly(corpus_dir, tmp_path, compose_cfg, monkeypatch):
    averaging = ["hooks.weight_averaging.start=0.25", "hooks.weight_averaging.ema_steps=50"]
    overrides = [*TINY, f"dataset.path={corpus_dir}", "model.dropout=0.3", "trainer.epochs=2", *averaging]
    straight = train_and_report(compose_cfg(overrides), tmp_path / "straight")
    with monkeypatch.context() as patch:
        _stop_at_step(patch, 100)  # mid-epoch 2, 56 steps into the mean
        with pytest.raises(Exception, match="stopped by SIGTERM"):
            train_and_report(compose_cfg(overrides), tmp_path / "resumed")
    resumed = train_and_report(compose_cfg(overrides), tmp_path / "resumed")
    assert _without_timing(resumed) == _without_timing(straight)
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("straight", "resumed"))
    assert a["averaged_steps"] == b["averaged_steps"] == 2 * 88 - 44 + 1  # TINY: 88 steps an epoch; from step 44
    assert all(torch.equal(a["weight_average"][k], b["weight_average"][k]) for k in a["weight_average"])
    assert not torch.equal(a["weight_average"]["embedding.weight"], a["model_state"]["embedding.weight"])


def test_dropout_budget_trains_as_the_scaled_dropout_would_and_records_its_scale(corpus_dir, tmp_path, compose_cfg):
    base = [*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=2"]
    runs = {
        "scaled": [*base, "model.dropout=0.3", "hooks.dropout_budget.full_at_epochs=4"],  # 2 epochs of 4: half
        "half": [*base, "model.dropout=0.15"],
        "full": [*base, "model.dropout=0.3"],
    }
    results = {name: _without_timing(train_and_report(compose_cfg(o), tmp_path / name)) for name, o in runs.items()}
    assert results["scaled"] == results["half"] != results["full"]
    records = (tmp_path / "scaled" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["dropout_scale"] for line in records] == [0.5, 0.5]


def test_resume_refuses_a_checkpoint_of_another_model(corpus_dir, tmp_path, compose_cfg):
    out = tmp_path / "run"
    train_and_report(compose_cfg([*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=1"]), out)
    other = compose_cfg(
        [
            *TINY,
            f"dataset.path={corpus_dir}",
            "trainer.epochs=2",
            "model.hidden_dim=16",
            f"hooks.checkpoint.resume={out / 'checkpoints' / 'last.pt'}",
        ]
    )
    with pytest.raises(CheckpointError, match="another vocabulary or model config"):
        train_and_report(other, tmp_path / "other")


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"generation": 1}, path)

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(
        DiskFull, match=r"no space left on the disk while writing .*last.pt \(the previous file is intact"
    ):
        atomic_save({"generation": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"generation": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_checkpoints_are_refused_and_nothing_runs(tmp_path, corpus_dir, compose_cfg):
    out = tmp_path / "run"
    train_and_report(compose_cfg([*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=1"]), out)
    good = out / "checkpoints" / "best.pt"

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(truncated)

    garbage = tmp_path / "notes.pt"
    garbage.write_text("just some text\n")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(garbage)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not an lmlab checkpoint"):
        load_checkpoint(foreign)

    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    evil = tmp_path / "evil.pt"
    torch.save({"format": "lmlab-checkpoint", "payload": exploit}, evil)
    with pytest.raises(CheckpointError, match="nothing was executed"):
        load_checkpoint(evil)
    assert not marker.exists()
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(exploit, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "plain.pkl")
    assert not marker.exists()

    state = torch.load(good, weights_only=True)
    state["model"]["name"] = "os.system"
    retargeted = tmp_path / "retargeted.pt"
    torch.save(state, retargeted)
    with pytest.raises(CheckpointError, match="'os.system' is not a registered model"):
        load_checkpoint(retargeted)

    state = torch.load(good, weights_only=True)
    state["vocab"] = state["vocab"] + ["extra-word"]
    mismatched = tmp_path / "mismatched.pt"
    torch.save(state, mismatched)
    with pytest.raises(CheckpointError, match="does not fit its model"):
        model_from_checkpoint(mismatched, torch.device("cpu"))


def _inject_nan_at(monkeypatch, step: int) -> None:
    from lmlab.models import RNNLanguageModel

    original = RNNLanguageModel.loss
    calls = {"n": 0}

    def loss(self, features, targets):
        value = original(self, features, targets)
        if self.training:
            calls["n"] += 1
            if calls["n"] == step:
                return value * float("nan")
        return value

    monkeypatch.setattr(RNNLanguageModel, "loss", loss)


def test_non_finite_loss_stops_with_epoch_and_step(corpus_dir, tmp_path, compose_cfg, monkeypatch):
    _inject_nan_at(monkeypatch, 91)  # epoch 2, step 3
    with pytest.raises(NonFiniteLoss, match=r"in epoch 2, step 3\. The last good checkpoint is .*last.pt"):
        train_and_report(compose_cfg([*TINY, f"dataset.path={corpus_dir}"]), tmp_path / "run")
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(t).all() for t in last["model_state"].values())


def test_non_finite_loss_can_skip_the_batch(corpus_dir, tmp_path, compose_cfg, monkeypatch):
    _inject_nan_at(monkeypatch, 5)
    results = train_and_report(
        compose_cfg([*TINY, f"dataset.path={corpus_dir}", "hooks.non_finite.on_nan=skip_batch"]), tmp_path / "run"
    )
    epochs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs[0]["skipped_batches"] == 1 and "skipped_batches" not in epochs[1]
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in epochs)
    assert results["best_val_ppl"] < 5


def _start_run(out: Path, corpus: Path) -> subprocess.Popen:
    args = [
        *TINY,
        f"dataset.path={corpus}",
        "trainer.epochs=200",
        "hooks.checkpoint.save_every_steps=20",
        f"hydra.run.dir={out}",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "lmlab.run", *args],
        cwd=USER_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_sigterm_saves_and_exits_for_requeue_then_resumes(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    proc = _start_run(out, corpus)
    _wait_for(out / "metrics.jsonl", proc)  # an epoch has finished
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and f"hydra.run.dir={out}" in stderr
    saved = load_checkpoint(out / "checkpoints" / "last.pt")
    assert saved["epoch"] >= 2
    epochs_done = len((out / "metrics.jsonl").read_text().splitlines())
    assert epochs_done == len(saved["history"])


def test_a_second_ctrl_c_quits_at_once(tmp_path):
    """(One Ctrl-C saves last.pt, exits 130 and the run resumes: tests/e2e/test_console.py, which reads its lines.)"""
    corpus = write_corpus(tmp_path / "corpus")
    proc = _start_run(tmp_path / "run2", corpus)
    _wait_for(tmp_path / "run2" / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode != 0


def test_resume_with_variable_bptt_and_awd_options_is_exact(corpus_dir, tmp_path, compose_cfg, monkeypatch):
    overrides = [
        *TINY,
        f"dataset.path={corpus_dir}",
        "dataset.variable_bptt=true",
        "model.locked_dropout=true",
        "model.dropout=0.3",
        "model.weight_drop=0.2",
        "trainer.epochs=2",
    ]
    straight = train_and_report(compose_cfg(overrides), tmp_path / "straight")
    with monkeypatch.context() as patch:
        _stop_at_step(patch, 30)  # mid-epoch 1, inside a length-scaled window
        with pytest.raises(Exception, match="stopped by SIGTERM"):
            train_and_report(compose_cfg(overrides), tmp_path / "resumed")
    saved = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert saved["optimizer_state"]["param_groups"][0]["lr"] == 5  # the schedule's lr, not a scaled one
    resumed = train_and_report(compose_cfg(overrides), tmp_path / "resumed")
    assert _without_timing(resumed) == _without_timing(straight)
