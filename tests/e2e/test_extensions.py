"""Extensions in a real (tiny) run: a user's hook from config and two loggers at once, TensorBoard among them."""

import json

import pytest

from lmlab.job import train_and_report
from tests.conftest import TINY


def test_a_users_hook_and_tensorboard_take_part_in_a_run(tmp_path, corpus_dir, compose_cfg):
    pytest.importorskip("tensorboard")
    import my_extensions
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = [*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=2", "plugins=[my_extensions]",
                 "+hooks.count._target_=my_extensions.CountSteps", "+hooks.count.stop_after=1000",
                 "logger=[tensorboard]", "+logger.epochs_file.file_name=epochs.txt"]  # fmt: skip
    results = train_and_report(compose_cfg(overrides), tmp_path / "run")
    hook = my_extensions.CountSteps.instances[-1]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert hook.epochs_seen == [1, 2] and hook.steps == 2 * 88  # every step of both epochs
    assert [json.loads(x)["epoch"] for x in (tmp_path / "run" / "epochs.txt").read_text().splitlines()] == [1, 2]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [round(e.value, 6) for e in events.Scalars("val/loss")] == [round(m["val_loss"], 6) for m in lines]
    assert events.Scalars("test/ppl")[0].value == pytest.approx(results["test_ppl"], rel=1e-6)

    stopped = train_and_report(compose_cfg([*overrides[:-4], "+hooks.count._target_=my_extensions.CountSteps",
                                            "+hooks.count.stop_after=5"]), tmp_path / "stopped")  # fmt: skip
    assert my_extensions.CountSteps.instances[-1].steps == 5 and stopped["epochs_run"] == 1  # it ended training
