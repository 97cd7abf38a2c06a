"""W&B: a failing backend never stops training; a resumed run re-attaches to the same W&B run."""

import json
import warnings

import pytest

from lmlab.job import train_and_report
from lmlab.loggers.wandb import WandbLogger, flatten
from tests.conftest import TINY
from tests.e2e.test_reliability import _stop_at_step
from tests.e2e.wandb_records import summarize


def test_flatten_uses_dotted_keys():
    assert flatten({"model": {"hidden_dim": 650, "cell": "lstm"}, "seed": 1}) == {
        "model.hidden_dim": 650,
        "model.cell": "lstm",
        "seed": 1,
    }


@pytest.mark.parametrize("failure", ["init", "log"])
def test_failing_wandb_warns_once_and_training_goes_on(failure, corpus_dir, tmp_path, compose_cfg, monkeypatch):
    import wandb

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device") if failure == "log" else wandb.errors.CommError("no network")

    if failure == "init":
        monkeypatch.setattr(wandb, "init", broken)
    else:
        monkeypatch.setattr(wandb.Run, "log", broken)
    cfg = compose_cfg([*TINY, f"dataset.path={corpus_dir}", "logger=wandb", "hooks.progress.log_interval=10"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = train_and_report(cfg, tmp_path / "run")
    ours = [w for w in caught if "W&B" in str(w.message)]
    assert len(ours) == 1 and "continuing with local files only" in str(ours[0].message)
    assert results["epochs_run"] == 3 and (tmp_path / "run" / "results.json").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_resumed_run_reattaches_the_same_wandb_run(corpus_dir, tmp_path, compose_cfg, monkeypatch):
    import wandb

    overrides = [*TINY, f"dataset.path={corpus_dir}", "logger=wandb", "hooks.progress.log_interval=10"]
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _stop_at_step(patch, 100)
        with pytest.raises(Exception, match="stopped by SIGTERM"):
            train_and_report(compose_cfg(overrides), out)
    train_and_report(compose_cfg(overrides), out)
    # W&B's service holds a run's records in memory until the stream closes, which can come after
    # run.finish() returns on a loaded machine; teardown waits for the service to exit.
    wandb.teardown()
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2
    first, second = (summarize(f) for f in files)
    assert first["run_id"] == second["run_id"]
    epochs = [json.loads(row["epoch"]) for row in first["history"] + second["history"] if "val/ppl" in row]
    assert epochs == [1, 2, 3]  # the curve continues where it stopped


def test_logger_state_round_trips():
    logger = WandbLogger("/tmp/unused", {}, mode="disabled")
    assert logger.state() == {}
    logger.restore([], {"run_id": "abc123"})
    assert logger.state() == {"run_id": "abc123"}
    for crafted in ("../../../tmp/evil", "a/b", "", 42, None, "x" * 65):  # W&B makes a folder name of it
        fresh = WandbLogger("/tmp/unused", {}, mode="disabled")
        fresh.restore([], {"run_id": crafted})
        assert fresh.state() == {}
