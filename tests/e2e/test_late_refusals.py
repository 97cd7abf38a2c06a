"""Values that were accepted, crashed or ran code before being refused: each is now one line, before any work."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from lmlab.errors import ConfigError
from lmlab.job import train_and_report
from lmlab.models import model_class
from tests.commands import lmlab
from tests.conftest import TINY


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["+logger.tensorboard.out_dir=/tmp/elsewhere", "logger=tensorboard"],
            "logger.tensorboard.out_dir is not a setting",
        ),
        (["logger=wandb", "+logger.wandb.run_config=x"], "logger.wandb.run_config is not a setting"),
        (["dataset.min_freq=1000000000"], "dataset.min_freq=1000000000 leaves no word besides <unk> and <eos>"),
        (["+hooks.lr_schedule.bogus=1"], "hooks.lr_schedule.bogus set on hooks.lr_schedule, which is off"),
        (["model=ngram_pointer_lstm", "model.ngram_order=1"], "model.ngram_order=1 leaves no word of history"),
    ],
)
def test_refused_in_one_line_before_any_work(overrides, message, corpus_dir, tmp_path, compose_cfg):
    cfg = compose_cfg([*TINY, f"dataset.path={corpus_dir}", *overrides])
    with pytest.raises(ConfigError, match=message):
        train_and_report(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_hook_target_that_is_no_hook_is_refused_without_being_called(corpus_dir, tmp_path, compose_cfg, capfd):
    cfg = compose_cfg([*TINY, f"dataset.path={corpus_dir}", "+hooks.mine._target_=builtins.print"])
    with pytest.raises(ConfigError, match=r"hooks.mine._target_=builtins.print is not a hook"):
        train_and_report(cfg, tmp_path / "run")
    assert capfd.readouterr().out == ""  # print was never called


def test_full_coupling_is_accepted_as_documented():
    model = model_class("ngram_pointer_rnn")(20, embed_dim=8, hidden_dim=8, ngram_coupling=1.0)
    assert model.ngram_coupling == 1.0


def test_an_ensemble_names_each_member_once_and_never_the_evaluated_checkpoint(trained, tmp_path):
    best = trained[0] / "checkpoints" / "best.pt"
    copy = tmp_path / "copy.pt"
    shutil.copy(best, copy)
    corpus = trained[1]
    data = ["dataset=text_dir", f"dataset.path={corpus}", "device=cpu"]
    twice = lmlab("lmlab.evaluate", f"checkpoint={best}", "method=ensemble", f"ensemble.members=[{copy},{copy}]", *data)
    assert twice.returncode == 2 and f"ensemble.members names {copy} twice" in twice.stderr
    itself = lmlab("lmlab.evaluate", f"checkpoint={best}", "method=ensemble", f"ensemble.members=[{best}]", *data)
    assert itself.returncode == 2 and "the checkpoint being evaluated" in itself.stderr
    on_valid = lmlab(
        "lmlab.evaluate", f"checkpoint={best}", "method=ensemble", f"ensemble.members=[{copy}]", "split=valid",
        "ensemble.search=true", *data,
    )  # fmt: skip
    assert on_valid.returncode == 2 and "cannot also score it" in on_valid.stderr
    for done in (twice, itself, on_valid):
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def pointer_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pointer")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lmlab.config import CONF_DIR
    from tests.conftest import write_corpus

    corpus = write_corpus(folder / "corpus")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=[*TINY, "model=pointer_lstm", f"dataset.path={corpus}", "trainer.epochs=1"])
    GlobalHydra.instance().clear()
    train_and_report(cfg, folder / "run")
    return folder / "run" / "checkpoints" / "best.pt"


@pytest.mark.parametrize("window", [10**12, pytest.param(10**8, marks=pytest.mark.slow)])
def test_a_checkpoint_that_states_an_absurd_window_is_refused_before_any_allocation(
    pointer_checkpoint, tmp_path, window
):
    import torch

    state = torch.load(pointer_checkpoint, weights_only=True)
    state["model"]["arguments"]["pointer_window"] = window
    crafted = tmp_path / "crafted.pt"
    torch.save(state, crafted)
    for module, args in (("lmlab.generate", ["num_words=3"]), ("lmlab.evaluate", [])):
        done = lmlab(module, f"checkpoint={crafted}", "device=cpu", *args)
        assert done.returncode == 4, done.stderr
        assert "pointer_window" in done.stderr and "up to 10,000" in done.stderr and "Traceback" not in done.stderr


def test_a_resumed_sweep_never_reuses_a_job_finished_with_other_overrides(corpus_dir, tmp_path):
    from tests.e2e.test_sweeps import SWEEP, job_dirs

    sweep = tmp_path / "sweep"

    def sweep_run(*extra: str) -> subprocess.CompletedProcess:
        args = [*SWEEP, f"dataset.path={corpus_dir}", "trainer.epochs=1", "model.hidden_dim=16,24", *extra]
        return lmlab("lmlab.run", "-m", *args, f"hydra.sweep.dir={sweep}", timeout=600)

    first = sweep_run("++model.embed_dim=16")
    assert first.returncode == 0, first.stderr[-2000:]
    jobs = job_dirs(sweep)  # named by the swept key alone: a resumed sweep finds them again
    results = [(job / "results.json").read_text() for job in jobs]
    again = sweep_run()  # the same job folders, without ++model.embed_dim=16
    assert again.returncode == 1
    assert "holds a finished job with other overrides (it ran with ++model.embed_dim=16)" in again.stderr
    assert [(job / "results.json").read_text() for job in jobs] == results  # the figures stay as they were
    same = sweep_run("++model.embed_dim=16")
    assert same.returncode == 0 and "finished before, kept as it was" in same.stdout


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: s["vocab"].__setitem__(3, s["vocab"][4]), "its field 'vocab' names a word twice"),
        (lambda s: s["model_state"].__setitem__("decoder.bias", s["model_state"]["decoder.bias"].long()),
         "its field 'model_state.decoder.bias' holds integers"),
        (lambda s: s.__setitem__("version", "2"), "has checkpoint version '2' (not a number)"),
    ],
)  # fmt: skip
def test_a_damaged_checkpoint_field_is_one_line_naming_file_and_field(trained, tmp_path, damage, message):
    import torch

    state = torch.load(trained[0] / "checkpoints" / "best.pt", weights_only=True)
    damage(state)
    crafted = tmp_path / "crafted.pt"
    torch.save(state, crafted)
    done = lmlab("lmlab.evaluate", f"checkpoint={crafted}", "device=cpu")
    assert done.returncode == 4 and str(crafted) in done.stderr and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_last_pt_with_an_absurd_tensorboard_step_is_one_line(corpus_dir, tmp_path):
    import torch

    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    args = [*TINY, f"dataset.path={corpus_dir}", "logger=tensorboard", f"hydra.run.dir={run}"]
    first = lmlab("lmlab.run", *args, "trainer.epochs=1")
    assert first.returncode == 0, first.stderr
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["logger_state"] = {key: {**(value or {}), "step": 10**30} for key, value in state["logger_state"].items()}
    torch.save(state, last)
    resumed = lmlab("lmlab.run", *args, "trainer.epochs=2")
    assert resumed.returncode == 4 and "TensorBoard step" in resumed.stderr and "Traceback" not in resumed.stderr


@pytest.mark.parametrize(
    "refused",
    [
        ["+hooks.mine._target_=builtins.print"],
        ["model=ngram_pointer_lstm", "model.ngram_order=1"],
        ["logger=tensorboard", "+logger.tensorboard.out_dir=elsewhere"],
    ],
)
def test_a_refused_run_leaves_no_folder_and_runs_nothing(refused, corpus_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    done = lmlab("lmlab.run", *TINY, f"dataset.path={corpus_dir}", *refused, cwd=work)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
    assert list(work.iterdir()) == []  # no folder
    banner = ("lmlab run:", "run folder:", "device:", "data:", "model:", "plan:")  # the start banner, nothing else:
    assert all(line.startswith(banner) for line in done.stdout.splitlines()), done.stdout  # builtins.print never ran


def test_a_checkpoints_absurd_batching_is_the_files_fault(trained, tmp_path):
    import torch

    state = torch.load(trained[0] / "checkpoints" / "best.pt", weights_only=True)
    state["config"]["dataset"]["eval_batch_size"] = 10**12
    crafted = tmp_path / "crafted.pt"
    torch.save(state, crafted)
    done = lmlab("lmlab.evaluate", f"checkpoint={crafted}", "device=cpu")
    assert done.returncode == 4 and "dataset.eval_batch_size=1000000000000" in done.stderr
    assert "dataset=text_dir dataset.path=DIR" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("refused", ["model=lstm,transformer_xl", "model.hiden_dim=16,24"])
def test_a_sweep_hydra_refuses_leaves_no_folder(refused, tmp_path):
    """Hydra refuses the sweep's config (an unknown option, a misspelt key) before any job: its own message,
    exit 1, one line saying no job ran, and no sweep folder with a ``multirun.yaml`` and "0 finished"."""
    work = tmp_path / "work"
    work.mkdir()
    done = lmlab("lmlab.run", "-m", refused, "trainer.epochs=1", cwd=work)
    assert done.returncode == 1 and "the sweep ran no job (refused above)" in done.stderr
    assert "0 finished" not in done.stdout and list(work.iterdir()) == []
