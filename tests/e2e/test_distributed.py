"""Two CPU processes with gloo under torchrun: the same step as one process at the full batch, only rank 0
writes, and a SIGTERM on every rank saves one last.pt from which the run ends as if never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import TINY, write_corpus

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmlab.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=ENV, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model_state"]


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*")}


RNN = [*TINY, "trainer.epochs=1", "trainer.limit_train_batches=3"]
TRANSFORMER = [
    *(o for o in RNN if not o.startswith("model.")),
    "model=transformer",
    "optimizer=sgd",  # TINY's optimizer.lr=5 is an SGD rate (a Transformer option brings AdamW otherwise)
    "model.d_model=32",
    "model.num_heads=2",
    "model.num_layers=1",
    "model.ff_dim=64",
    "model.dropout=0.0",
    "model.context=8",
]
AWD = [*RNN, "dataset.variable_bptt=true", "optimizer=nt_asgd", "optimizer.lr=5", "model.weight_drop=0.0"]
# The two rarest words as a cluster of their own: most steps leave it without a target on some rank.
ADAPTIVE = [*RNN, "model.softmax=adaptive", "model.adaptive_cutoffs=[6,17]"]


@pytest.mark.parametrize(
    "setup",
    [RNN, *(pytest.param(setup, marks=pytest.mark.slow) for setup in (TRANSFORMER, AWD, ADAPTIVE))],
    ids=["lstm", "transformer", "variable_bptt+nt_asgd", "tied-adaptive"],
)  # the other models and optimizers: CI's slow tier
def test_two_processes_take_the_step_of_one_at_the_full_batch_and_only_rank_0_writes(tmp_path, corpus_dir, setup):
    """... and leave the group cleanly before rank 0's single-process work after the test (``test_with``)."""
    args = [*setup, f"dataset.path={corpus_dir}", "test_with=[ngram]"]
    (tmp_path / "ddp").mkdir()
    _run([sys.executable, "-m", "lmlab.run", *args, f"hydra.run.dir={tmp_path / 'single'}"], tmp_path)
    done = _run([*TORCHRUN, *args], tmp_path / "ddp")  # Hydra's default folder under outputs/, as a user gets

    runs = list((tmp_path / "ddp" / "outputs").glob("*/*"))
    assert len(runs) == 1, runs  # rank 1 made no folder of its own
    run, single = runs[0], tmp_path / "single"
    assert _files(run) == _files(single)  # the same files as one process writes (and no second log)
    one, two = _weights(single), _weights(run)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)
    results = {r: json.loads((r / "results.json").read_text()) for r in (single, run)}
    assert results[run]["processes"] == 2 and results[single]["processes"] == 1
    assert results[run]["test_loss"] == pytest.approx(results[single]["test_loss"], rel=1e-6)  # exact totals
    reported = [line for line in done.stdout.splitlines() if line.startswith("test-loss")]
    assert len(reported) == 2 and reported[1].endswith("(ngram)")  # one rank reports: the model, the mixture
    assert results[run]["test_ppl_ngram"] == pytest.approx(results[single]["test_ppl_ngram"], rel=1e-6)
    assert "terminate called" not in done.stderr  # every rank left the group before rank 0's n-gram work


def _children(pid: int) -> list[int]:
    """The worker processes torchrun started (its children running lmlab.run)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid and b"lmlab.run" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
@pytest.mark.slow  # the single-process path: tests/e2e/test_reliability.py (SIGTERM saves, exits, resumes exactly)
def test_sigterm_on_every_rank_saves_one_last_pt_and_the_resumed_run_ends_with_the_same_figures(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", train=1000)  # ~200 steps an epoch: the signal comes at step 10
    args = [*TINY, f"dataset.path={corpus}", "trainer.epochs=2", "model.dropout=0.3", "model.hidden_dim=64",
            "hooks.progress.log_interval=5", "hooks.weight_averaging.start=0",  # the mean resumes too
            "hooks.dropout_budget.full_at_epochs=4"]  # fmt: skip  # 2 epochs of 4: half the dropout on both ranks
    full = _run([*TORCHRUN, *args, f"hydra.run.dir={tmp_path / 'full'}"], tmp_path)
    assert "stopped" not in full.stderr

    cut = tmp_path / "cut"
    proc = subprocess.Popen([*TORCHRUN, *args, f"hydra.run.dir={cut}"], cwd=tmp_path, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    for line in proc.stdout:  # training has started: progress lines come every 5 steps
        if "epoch 1 | step 10/" in line:
            break
    workers = _children(proc.pid)
    assert len(workers) == 2
    for pid in workers:  # as SLURM does: every task gets the signal, at slightly different moments
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert stderr.count("stopped by SIGTERM") == 1 and "Resume with: torchrun --nproc_per_node=2" in stderr
    saved = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["step"] > 0 and len(saved["ranks"]) == 2  # mid-epoch, both ranks' state
    assert saved["averaged_steps"] == saved["global_step"]  # the weights' mean so far, resumed below
    assert saved["dropout_scale"] == 0.5
    assert not list((cut / "checkpoints").glob(".*.tmp"))

    resumed = _run([*TORCHRUN, *args, f"hydra.run.dir={cut}"], tmp_path)
    assert "Resuming from" in resumed.stdout
    figures = [json.loads((run / "results.json").read_text()) for run in (tmp_path / "full", cut)]
    for key in ("best_val_loss", "test_loss"):
        assert figures[1][key] == pytest.approx(figures[0][key], rel=1e-6), key
    curves = [[json.loads(x)["val_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (tmp_path / "full", cut)]  # fmt: skip
    assert curves[1] == pytest.approx(curves[0], rel=1e-6)


def _slurm_tasks(tmp_path: Path, code: str) -> list[list[str]]:
    """Run ``code`` as the 2 tasks hydra/launcher=slurm with tasks_per_node=2 starts (submitit's SLURM
    variables); returns each task's stdout words."""
    probe = tmp_path / "probe.py"
    probe.write_text(code)
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "MASTER_PORT": str(29_000 + os.getpid() % 1000),
    }  # fmt: skip
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK")}
    tasks = [
        subprocess.Popen(
            [sys.executable, str(probe)],
            env={**env, **slurm, "SLURM_PROCID": r, "SLURM_LOCALID": r},
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in ("0", "1")
    ]
    outputs = [task.communicate(timeout=60)[0].split() for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0]
    return outputs


def test_slurm_tasks_started_by_submitit_join_one_group(tmp_path):
    outputs = _slurm_tasks(
        tmp_path,
        "import torch\nfrom lmlab.runtime import distributed\nplace = distributed.setup()\n"
        "total = distributed.all_reduce_sum(torch.tensor([place.rank + 1.0]))\n"
        "print(place.rank, place.world_size, place.local_rank, int(total.item()))\n",
    )
    assert outputs == [["0", "2", "0", "3"], ["1", "2", "1", "3"]]


def test_every_rank_leaves_its_group_before_the_interpreter_finalises(tmp_path):
    """The cause of "terminate called without an active exception" (a finished rank exiting with -6): a
    group left alive until finalisation, when gloo's threads are torn down by C++ destructors. The
    handler registered first runs last (atexit is LIFO): by then setup()'s teardown must have run."""
    outputs = _slurm_tasks(
        tmp_path,
        "import atexit, torch, torch.distributed as dist\n"
        "atexit.register(lambda: print('alive-at-exit', dist.is_initialized(), flush=True))\n"
        "from lmlab.runtime import distributed\nplace = distributed.setup()\n"
        "distributed.all_reduce_sum(torch.ones(3))\nprint('gathered', len(distributed.gather(place.rank)))\n",
    )
    assert outputs == [["gathered", "2", "alive-at-exit", "False"]] * 2


def test_a_batch_that_does_not_split_is_refused_in_one_line_and_leaves_no_folder(tmp_path, corpus_dir):
    done = subprocess.run([*TORCHRUN, *TINY, f"dataset.path={corpus_dir}", "dataset.batch_size=5"], cwd=tmp_path,
                          capture_output=True, text=True, env=ENV, timeout=120)  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: dataset.batch_size=5 does not split over 2 processes (each owns an equal share of the "
                      "columns); use a multiple of 2, e.g. dataset.batch_size=6 or 4"]  # fmt: skip
    assert not list(tmp_path.glob("outputs/*/*"))


def test_submitit_preemption_signal_saves_last_pt_before_submitit_requeues(tmp_path):
    """In a submitit SLURM job SIGUSR2 means "requeue soon": save first, then hand the signal to submitit."""
    corpus = write_corpus(tmp_path / "corpus", train=3000)
    (tmp_path / "fake_submitit.py").write_text(  # stands in for submitit's SIGUSR2 handler (requeue, exit)
        "import json, signal, sys, torch\n"
        "def requeue(signum, frame):\n"
        f"    saved = torch.load({str(tmp_path / 'run' / 'checkpoints' / 'last.pt')!r}, weights_only=True)\n"
        f"    open({str(tmp_path / 'requeued.json')!r}, 'w').write(json.dumps([saved['epoch'], saved['step']]))\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGUSR2, requeue)\n"
    )
    env = {**ENV, "SUBMITIT_EXECUTOR": "slurm", "PYTHONPATH": str(tmp_path)}
    args = [*TINY, f"dataset.path={corpus}", "hooks.progress.log_interval=5", "plugins=[fake_submitit]"]
    command = [sys.executable, "-m", "lmlab.run", *args, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stdout:
        if "epoch 1 | step 10/" in line:
            break
    proc.send_signal(signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=120)
    assert "stopped by SIGUSR2" in stderr
    epoch, step = json.loads((tmp_path / "requeued.json").read_text())
    assert epoch == 1 and step >= 10  # submitit's handler ran after last.pt held the step training stopped at


@pytest.mark.slow  # once more per model in the parity test above, which runs test_with=[ngram] too
@pytest.mark.parametrize("attempt", [0, 1, 2])
def test_a_finished_two_process_run_exits_cleanly_every_time(attempt, tmp_path, corpus_dir):
    """Every rank leaves the group together after the test (lmlab.runtime.distributed.leave), before rank 0's
    single-process work; a rank that exited while the group was still held aborted one run in five or six
    (experiments/ddp_exit_stress.sh repeats it 50 times)."""
    args = [*RNN, f"dataset.path={corpus_dir}", "test_with=[ngram]", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(
        [*TORCHRUN, *args],
        cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called" not in done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["processes"] == 2 and results["test_ppl_ngram"] > 0  # rank 0's work after the group
