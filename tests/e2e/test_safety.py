"""Reliability, round two: one writer per run folder, diverged weights never called good, resume applies
changed optimizer values, no leftovers, one line per failure kind, signals in every phase, bounded W&B."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmlab.data.corpus import SPLITS, _cache_name, cache_dir
from lmlab.errors import CheckpointError, NonFiniteLoss, RunFolderBusy
from lmlab.job import train_and_report
from lmlab.runtime.files import RunLock, remove_stale_temp_files
from lmlab.training.checkpoint_format import load_checkpoint
from lmlab.training.trainer import Trainer
from tests.commands import lmlab
from tests.conftest import TINY
from tests.e2e.test_reliability import _inject_nan_at, _start_run, _wait_for

ROOT = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_into_a_busy_folder_is_refused_and_the_first_is_intact(tmp_path, corpus_dir):
    out = tmp_path / "run"
    first = _start_run(out, corpus_dir)
    _wait_for(out / "metrics.jsonl", first)
    record = {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()}
    second = lmlab(
        "lmlab.run", *TINY, f"dataset.path={corpus_dir}", "model.hidden_dim=24", f"hydra.run.dir={out}", timeout=120
    )
    assert second.returncode == 6, second.stderr
    assert second.stderr.startswith(f"error: {out} is in use by another run (pid {first.pid}")
    assert len(second.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()} == record  # the live run's record kept
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 143
    saved = load_checkpoint(out / "checkpoints" / "last.pt")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(saved["history"])  # nothing interleaved
    assert not (out / ".lmlab.lock").exists()  # released on exit


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, corpus_dir, compose_cfg):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(RunFolderBusy):  # held by a live process (this one)
            train_and_report(compose_cfg([*TINY, f"dataset.path={corpus_dir}"]), out)
    import socket

    host = socket.gethostname().replace(".", "_")
    (out / ".lmlab.lock").write_text(json.dumps({"host": host, "pid": _dead_pid(), "started": "earlier"}))
    results = train_and_report(compose_cfg([*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=1"]), out)
    assert results["epochs_run"] == 1 and not (out / ".lmlab.lock").exists()


def _race_for_the_lock(folder: Path, barrier, holding: Path) -> None:
    barrier.wait()
    try:
        with RunLock(folder):
            (holding / str(os.getpid())).touch()
            time.sleep(0.05)
            # holders at this moment: the markers, not the .count files earlier holders left (a process that
            # arrives after one released the lock takes it anew, legitimately)
            count = sum(1 for p in holding.iterdir() if p.suffix != ".count")
            (holding / f"{os.getpid()}.count").write_text(str(count))
            (holding / str(os.getpid())).unlink()
    except RunFolderBusy:
        pass


def test_many_processes_racing_for_a_stale_lock_never_make_two_holders(tmp_path):
    import multiprocessing
    import socket

    ctx = multiprocessing.get_context("fork")
    host = socket.gethostname().replace(".", "_")
    for trial in range(10):
        folder, holding = tmp_path / f"run{trial}", tmp_path / f"holding{trial}"
        for path in (folder, holding):
            path.mkdir()
        (folder / ".lmlab.lock").write_text(json.dumps({"host": host, "pid": _dead_pid(), "started": "earlier"}))
        barrier = ctx.Barrier(8)
        procs = [ctx.Process(target=_race_for_the_lock, args=(folder, barrier, holding)) for _ in range(8)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=60)
        counts = [int(p.read_text()) for p in holding.glob("*.count")]
        assert counts and max(counts) == 1, counts  # at least one took it; never two at once
        assert not (folder / ".lmlab.lock").exists()  # the last holder removed it


@pytest.mark.parametrize("every", ["null", "1"], ids=["epoch-end saves", "save_every_steps=1"])
def test_divergence_names_a_finite_checkpoint_that_resumes_with_a_lower_lr(
    tmp_path, corpus_dir, compose_cfg, capsys, every
):
    """With a save after every step too: a last.pt is written only once a loss computed with its weights
    passed, so the named checkpoint never holds the update that exploded."""
    out = tmp_path / "run"
    base = [
        *TINY,
        f"dataset.path={corpus_dir}",
        "trainer.clip_grad_norm=null",
        f"hooks.checkpoint.save_every_steps={every}",
    ]
    train_and_report(compose_cfg([*base, "trainer.epochs=1"]), out)
    with pytest.raises(NonFiniteLoss, match=r"The last good checkpoint is .*last.pt; resume from it") as err:
        train_and_report(compose_cfg([*base, "trainer.epochs=3", "optimizer.lr=1e35"]), out)
    assert "optimizer.lr: 5 -> 1e+35 (applied)" in capsys.readouterr().out  # the resume applied it
    named = Path(str(err.value).split("The last good checkpoint is ")[1].split(";")[0])
    state = load_checkpoint(named)
    assert state["epoch"] == 2 and all(torch.isfinite(t).all() for t in state["model_state"].values())

    results = train_and_report(compose_cfg([*base, "trainer.epochs=3", "optimizer.lr=1"]), out)
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in epochs] == [5, 1, 1] and results["test_ppl"] < 19  # the lower lr took effect


def test_resume_refuses_changed_data_settings(tmp_path, corpus_dir, compose_cfg):
    out = tmp_path / "run"
    train_and_report(compose_cfg([*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=1"]), out)
    cfg = compose_cfg([*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=2", "dataset.bptt=6"])
    with pytest.raises(CheckpointError, match=r"changed settings: dataset.bptt: 8 -> 6\. Restore them"):
        train_and_report(cfg, out)


def test_skip_batch_stops_once_too_many_batches_were_skipped(monkeypatch, tmp_path, corpus_dir, compose_cfg):
    for step in range(3, 40):
        _inject_nan_at(monkeypatch, step)
    cfg = compose_cfg([*TINY, f"dataset.path={corpus_dir}", "hooks.non_finite.on_nan=skip_batch"])
    with pytest.raises(NonFiniteLoss, match=r"skipped 9 of 88 batches of epoch 1 .*max_skipped_fraction=0.1"):
        train_and_report(cfg, tmp_path / "run")


def test_temp_files_of_dead_writers_are_removed_on_the_next_start(tmp_path, corpus_dir, compose_cfg):
    out = tmp_path / "run"
    train_and_report(compose_cfg([*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=1"]), out)
    host = __import__("socket").gethostname().replace(".", "_")
    dead = out / "checkpoints" / f".last.pt.{host}-{_dead_pid()}.k3j4h2.tmp"
    live = out / "checkpoints" / f".last.pt.{host}-{os.getpid()}.a1b2c3.tmp"
    for tmp in (dead, live):
        tmp.write_bytes(b"half a checkpoint")
    assert remove_stale_temp_files(out / "checkpoints") == [dead] and live.exists()
    dead.write_bytes(b"half a checkpoint")
    live.unlink()
    train_and_report(compose_cfg([*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=2"]), out)  # resumes
    assert not list((out / "checkpoints").glob("*.tmp"))
    source = _cache_name({s: corpus_dir / f"{s}.txt" for s in SPLITS}).rsplit("-", 1)[0]
    caches = list(cache_dir().glob(f"{source}-*.pt"))
    os.utime(corpus_dir / "train.txt")  # a new mtime: the next run tokenises again and replaces the cache
    train_and_report(compose_cfg([*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=1"]), tmp_path / "other")
    now = list(cache_dir().glob(f"{source}-*.pt"))
    assert len(caches) == len(now) == 1 and now != caches  # one cache per source: the old one was removed


def test_sigterm_during_the_final_validation_saves_and_exits_143(monkeypatch, tmp_path, corpus_dir, compose_cfg):
    original, calls = Trainer.evaluate, {"n": 0}

    def evaluate(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # validation of epoch 2, the last
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    out = tmp_path / "run"
    cfg = [*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=2"]
    with pytest.raises(Exception, match="stopped by SIGTERM") as stop:
        train_and_report(compose_cfg(cfg), out)
    assert stop.value.exit_code == 143
    saved = load_checkpoint(out / "checkpoints" / "last.pt")  # epoch 2 trained, its validation pending
    assert saved["epoch"] == 2 and saved["step"] == 88 and len(saved["history"]) == 1
    monkeypatch.undo()
    results = train_and_report(compose_cfg(cfg), out)  # resume: validate epoch 2, then test and generation
    assert results["epochs_run"] == 2 and (out / "results.json").is_file()


def test_an_unreachable_wandb_gives_up_once_and_is_not_timed(monkeypatch, tmp_path, corpus_dir, compose_cfg):
    import wandb

    def unreachable(*args, **kwargs):
        time.sleep(1.5)  # what a bounded init_timeout looks like from here
        raise wandb.errors.CommError("timed out connecting to api.wandb.ai")

    monkeypatch.setattr(wandb, "init", unreachable)
    cfg = compose_cfg([*TINY, f"dataset.path={corpus_dir}", "logger=wandb", "trainer.epochs=1"])
    with pytest.warns(RuntimeWarning, match="W&B init failed .* continuing with local files only"):
        results = train_and_report(cfg, tmp_path / "run")
    epoch = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert epoch["elapsed_s"] < 1.5 and results["epochs_run"] == 1  # the wait is not training time


def test_each_failure_kind_is_one_line_with_its_own_exit_code(tmp_path, corpus_dir):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    cases = [
        (["lmlab.generate", f"checkpoint={empty}"], 4, "is not a readable checkpoint: it is empty (0 bytes"),
        (["lmlab.generate", f"checkpoint={empty}", "top_k=-5"], 2, "top_k=-5 is invalid"),
        (["lmlab.run", *TINY, f"dataset.path={corpus_dir}", "optimizer.lr=1e35", "trainer.clip_grad_norm=null",
          f"hydra.run.dir={tmp_path / 'run'}"], 3, "training diverged (non-finite or exploding loss) in epoch 1"),
    ]  # fmt: skip
    for args, code, message in cases:
        proc = lmlab(*args, timeout=120)
        assert proc.returncode == code, proc.stderr
        assert proc.stderr.startswith("error: ") and message in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "weights_only=False" not in proc.stderr
