"""A run writes inside its own folder and nowhere else: job folder names made from overrides stay one safe
name, a planted symbolic link is never written through, and a resume into a new folder that finds no better
epoch still reports the run and its best."""

from __future__ import annotations

import json
import os

import pytest

from tests.commands import lmlab
from tests.conftest import TINY


def test_a_job_folder_name_never_leaves_the_sweep_folder(tmp_path, corpus_dir):
    sweep = tmp_path / "deep" / "sweep"
    done = lmlab(
        "lmlab.run", "-m", *TINY, f"dataset.path={corpus_dir}", "trainer.epochs=1",
        "generate.prompt=a/../../../../escape,b c", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert set(os.listdir(tmp_path)) - {corpus_dir.name} == {"deep"} and os.listdir(tmp_path / "deep") == ["sweep"]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_prompt=a_________escape", "1_prompt=b__c"], jobs  # "/", "..", "\\ " each became "_"
    assert all((sweep / job / "results.json").is_file() for job in jobs)


@pytest.mark.parametrize("name", ["metrics.jsonl", "run.log", "steps.jsonl"])
def test_a_planted_symbolic_link_is_never_written_through(tmp_path, corpus_dir, name):
    run, target = tmp_path / "run", tmp_path / "elsewhere.txt"
    run.mkdir()
    target.write_text("the user's file\n")
    (run / name).symlink_to(target)
    done = lmlab("lmlab.run", *TINY, f"dataset.path={corpus_dir}", "trainer.epochs=1", f"hydra.run.dir={run}")
    assert done.returncode == 2 and f"{run / name} is a symbolic link" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert target.read_text() == "the user's file\n"


def test_a_resume_into_a_new_folder_that_finds_no_better_epoch_reports_the_run_and_its_best(tmp_path, corpus_dir):
    old, new = tmp_path / "old", tmp_path / "new"
    args = [*TINY, f"dataset.path={corpus_dir}"]
    first = lmlab("lmlab.run", *args, "trainer.epochs=1", f"hydra.run.dir={old}")
    assert first.returncode == 0, first.stderr
    # a far too high LR: the extra epoch is worse, so the best stays the old run's
    resumed = lmlab(
        "lmlab.run", *args, "trainer.epochs=2", "optimizer.lr=200", "hooks.non_finite.on_nan=skip_batch",
        f"hooks.checkpoint.resume={old}/checkpoints/last.pt", f"hydra.run.dir={new}",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    before, after = (json.loads((d / "results.json").read_text()) for d in (old, new))
    assert (new / "checkpoints" / "best.pt").read_bytes() == (old / "checkpoints" / "best.pt").read_bytes()
    assert after["best_val_ppl"] == before["best_val_ppl"] and after["test_ppl"] == before["test_ppl"]
