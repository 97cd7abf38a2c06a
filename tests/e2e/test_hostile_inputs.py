"""Hostile inputs, replayed as a user would meet them, each from a temporary folder: a value past what the machine
has, a ``_target_`` that is not what its group builds, a checkpoint whose numbers lie, a run record that is a FIFO
or a YAML bomb. Each is one line naming the value and the fix, with the documented exit code, and nothing written.
(One case of each kind in the README's command; the variants in CI's slow tier.)"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.commands import lmlab
from tests.conftest import TINY

# (overrides, exit code, what the one line says)
RUN_CASES = [
    (["model.hidden_dim=1000000000"], 2, "is too large to build"),
    (["model.embed_dim=10000000"], 2, "GiB free on this cpu"),
    (["model.hidden_dim=200000"], 2, "GiB free on this cpu"),
    (["device.num_threads=100000"], 2, "device.num_threads=100000 is invalid"),
    (["optimizer=nt_asgd", "optimizer.nonmono=-1"], 2, "optimizer.nonmono=-1 is invalid"),
    (["trainer._target_=builtins.dict"], 2, "trainer._target_=builtins.dict is not what the trainer group builds"),
    (["scheduler._target_=os.system"], 2, "scheduler._target_=os.system is not what the scheduler group builds"),
    (["device._target_=os.makedirs"], 2, "device._target_=os.makedirs is not what"),
    (["optimizer.lr=inf"], 2, "optimizer.lr=inf is invalid: it must be a finite number > 0"),
    (["optimizer.lr=nan"], 2, "optimizer.lr=nan is invalid"),
    (["trainer.clip_grad_norm=inf"], 2, "trainer.clip_grad_norm=inf is invalid"),
    (["hooks.progress.log_interval=0"], 2, "hooks.progress.log_interval=0 is invalid"),
    (["logger=wandb", "logger.wandb.mode=bogus"], 2, "logger.wandb.mode='bogus' is invalid"),
    (["generate.prompt=${oc.env:LMLAB_UNSET_VARIABLE}"], 2, "Environment variable 'LMLAB_UNSET_VARIABLE' not found"),
    (["generate.prompt=${eval:1+1}"], 2, "Unsupported interpolation type eval"),
]
FAST_RUN_CASES = {0, 5, 8, 11, 13}


@pytest.mark.parametrize(
    "overrides, code, line",
    [case if i in FAST_RUN_CASES else pytest.param(*case, marks=pytest.mark.slow) for i, case in enumerate(RUN_CASES)],
)
def test_a_hostile_value_is_one_line_and_leaves_no_folder(overrides, code, line, corpus_dir, tmp_path):
    run = tmp_path / "run"
    done = lmlab("lmlab.run", *TINY, f"dataset.path={corpus_dir}", *overrides, f"hydra.run.dir={run}")
    assert done.returncode == code and line in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not run.exists()


def test_a_target_cannot_make_a_run_call_a_plain_function(corpus_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("kept\n")
    done = lmlab(
        "lmlab.run", *TINY, f"dataset.path={corpus_dir}", "optimizer._target_=builtins.open",
        f"+optimizer.file={victim}", "+optimizer.mode=w", f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert done.returncode == 2 and "optimizer._target_=builtins.open is not what" in done.stderr, done.stderr
    assert victim.read_text() == "kept\n"


@pytest.mark.parametrize(
    "command, args, line",
    [
        ("lmlab.generate", ["+bogus=1"], "+bogus=1 adds a key that nothing reads"),
        ("lmlab.generate", ["num_words=1000000000000"], "num_words=1000000000000 is invalid"),
        pytest.param("lmlab.evaluate", ["+bogus=1"], "+bogus=1 adds a key", marks=pytest.mark.slow),
    ],
)
def test_generate_and_evaluate_refuse_what_they_would_ignore_or_never_finish(trained, command, args, line):
    run = trained[0]
    done = lmlab(command, f"checkpoint={run / 'checkpoints' / 'best.pt'}", "device=cpu", *args)
    assert done.returncode == 2 and line in done.stderr and "Traceback" not in done.stderr, done.stderr


def _damage(state: dict, case: str) -> str:
    """Change one number of a last.pt as an attacker would; returns what the refusal names."""
    if case == "step":
        state["step"] = 10**12
    elif case == "both steps":
        state["step"] = state["global_step"] = 10**12
    elif case == "epoch":
        state["epoch"] = 10**9
    elif case == "nan lr":
        state["optimizer_state"]["param_groups"][0]["lr"] = math.nan
    return {"both steps": "step", "nan lr": "learning rate"}.get(case, case)


@pytest.mark.parametrize("case", ["step", pytest.param("both steps", marks=pytest.mark.slow), "epoch", "nan lr"])
def test_a_last_pt_whose_numbers_lie_is_refused_as_damaged(trained, tmp_path, case):
    source, corpus, overrides, _ = trained
    run = tmp_path / "run"
    shutil.copytree(source, run)
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    named = _damage(state, case)
    torch.save(state, last)
    done = lmlab("lmlab.run", *overrides, "trainer.epochs=2", f"hydra.run.dir={run}")
    assert done.returncode == 4 and f"{last} is damaged" in done.stderr and named in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_stretched_tensor_in_a_checkpoint_is_refused_before_anything_reads_it(trained, tmp_path):
    state = torch.load(trained[0] / "checkpoints" / "best.pt", weights_only=True)
    name = next(iter(state["model_state"]))
    state["model_state"][name] = torch.zeros(1).expand(10**12)  # 4 TB if anything read every value
    crafted = tmp_path / "crafted.pt"
    torch.save(state, crafted)
    done = lmlab("lmlab.generate", f"checkpoint={crafted}", "device=cpu", "num_words=2")
    assert done.returncode == 4 and "stretched view" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_compare_lists_hostile_run_records_as_unreadable_and_never_hangs(trained, tmp_path):
    source = trained[0]
    runs = tmp_path / "runs"
    for name in ("fifo", "alias_bomb", "nan", "deep", "string"):
        shutil.copytree(source, runs / name)
    (runs / "fifo" / "results.json").unlink()
    os.mkfifo(runs / "fifo" / "results.json")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefg", "bcdefgh", strict=True)
    )
    (runs / "alias_bomb" / ".hydra").mkdir(exist_ok=True)
    (runs / "alias_bomb" / ".hydra" / "overrides.yaml").write_text(bomb)
    results = json.loads((source / "results.json").read_text())
    (runs / "nan" / "results.json").write_text(json.dumps({**results, "best_val_ppl": math.nan}))
    (runs / "string" / "results.json").write_text(json.dumps({**results, "best_val_ppl": "12"}))
    (runs / "deep" / "results.json").write_text("[" * 100_000 + "]" * 100_000)
    done = lmlab("lmlab.compare", str(runs), str(source), "--format", "md", timeout=60)
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines()[2:]}
    assert {name for name, row in rows.items() if "failed" in row} == {"fifo", "alias_bomb", "nan", "deep", "string"}
    assert "completed" in rows[Path(source).name]


@pytest.mark.parametrize("where", ["a component of 300 characters", "under a file", "checkpoints is a file"])
def test_a_run_folder_that_cannot_be_is_one_line(where, corpus_dir, tmp_path):
    (tmp_path / "a_file").write_text("x")
    run = {
        "a component of 300 characters": tmp_path / ("a" * 300),
        "under a file": tmp_path / "a_file" / "run",
        "checkpoints is a file": tmp_path / "run",
    }[where]
    if where == "checkpoints is a file":
        run.mkdir()
        (run / "checkpoints").write_text("x")
    done = lmlab("lmlab.run", *TINY, f"dataset.path={corpus_dir}", "trainer.epochs=1", f"hydra.run.dir={run}")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_tiny_temperature_samples_the_likeliest_word(trained):
    done = lmlab("lmlab.generate", f"checkpoint={trained[0] / 'checkpoints' / 'best.pt'}", "device=cpu",
                 "temperature=1e-300", "num_words=5", "seed=1")  # fmt: skip
    greedy = lmlab("lmlab.generate", f"checkpoint={trained[0] / 'checkpoints' / 'best.pt'}", "device=cpu",
                   "temperature=1e-6", "num_words=5", "seed=2")  # fmt: skip
    assert done.returncode == greedy.returncode == 0, done.stderr
    assert done.stdout == greedy.stdout  # greedy whatever the seed


@pytest.mark.parametrize("case", ["no <unk>", pytest.param("unknown dataset", marks=pytest.mark.slow)])
def test_a_checkpoint_that_breaks_lmlabs_own_rules_is_exit_4_naming_the_file(trained, tmp_path, case):
    state = torch.load(trained[0] / "checkpoints" / "best.pt", weights_only=True)
    if case == "no <unk>":
        state["vocab"][state["vocab"].index("<unk>")] = "unk-renamed"
    else:
        state["config"]["dataset"]["name"] = "no_such_dataset"
    crafted = tmp_path / "crafted.pt"
    torch.save(state, crafted)
    done = lmlab("lmlab.evaluate", f"checkpoint={crafted}", "device=cpu")
    assert done.returncode == 4 and str(crafted) in done.stderr and "Traceback" not in done.stderr, done.stderr
