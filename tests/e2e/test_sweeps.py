"""Hydra multirun sweeps (sequential, joblib, submitit_local, Optuna), W&B offline, lmlab.compare."""

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from lmlab.compare import main as compare_main
from tests.commands import lmlab
from tests.conftest import TINY

SWEEP = [o for o in TINY if not o.startswith("trainer.epochs")] + ["trainer.epochs=2"]


def multirun(
    tmp_path: Path,
    corpus: Path,
    *extra: str,
    base: list[str] = SWEEP,
    output: list | None = None,
    env: dict | None = None,
) -> Path:
    sweep_dir = tmp_path / "sweep"
    args = [
        "-m",
        *base,
        f"dataset.path={corpus}",
        *extra,
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = lmlab("lmlab.run", *args, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if output is not None:
        output.append(proc)
    return sweep_dir


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.glob("*/results.json"))


def _processes_with(variable: str) -> list[int]:
    """The processes whose environment holds ``variable`` (``NAME=value``), read from /proc."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if variable.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # ended meanwhile, or not ours
            pass
    return found


def test_joblib_launcher_runs_jobs_in_parallel_with_one_thread_each(tmp_path, corpus_dir):
    name, value = "LMLAB_TEST_SWEEP", str(tmp_path)  # inherited by every process the sweep starts
    mark = f"{name}={value}"
    sweep = multirun(
        tmp_path, corpus_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "dataset.batch_size=4,8",
        "model.hidden_dim=16,32", "~device.num_threads", env={**os.environ, name: value},
    )  # fmt: skip
    jobs = job_dirs(sweep)
    assert len(jobs) == 4
    results = [json.loads((j / "results.json").read_text()) for j in jobs]
    assert all(r["torch_threads"] == 1 for r in results)  # loky caps threads at cores // n_jobs
    deadline = time.monotonic() + 10
    while _processes_with(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_with(mark)  # the command took its joblib workers with it when it ended


def test_submitit_local_launcher(tmp_path, corpus_dir):
    sweep = multirun(
        tmp_path, corpus_dir, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "model.hidden_dim=16,32"
    )
    assert len(job_dirs(sweep)) == 2
    assert list(sweep.glob(".submitit/*"))  # the real submitit path ran


def test_optuna_sweep_minimises_validation_perplexity(tmp_path, corpus_dir):
    # Fixed values on the command line would pin the searched keys, so leave those three out.
    searched = ("optimizer.lr", "model.dropout", "model.hidden_dim")
    base = [o for o in SWEEP if not o.startswith(searched)]
    output: list = []
    sweep = multirun(
        tmp_path,
        corpus_dir,
        "+sweep=optuna",
        "hydra.sweeper.n_trials=3",
        "trainer.epochs=1",
        "model.embed_dim=16",
        base=base,
        output=output,
    )
    console = output[0].stdout + output[0].stderr
    assert "\x1b[" not in console and "setup plugin alembic" not in console  # no plugin chatter or colour codes
    assert len(job_dirs(sweep)) == 3
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    ppls = [json.loads((j / "results.json").read_text())["best_val_ppl"] for j in job_dirs(sweep)]
    assert best["best_value"] == pytest.approx(min(ppls))
    assert set(best["best_params"]) == set(searched)
    configs = [yaml.safe_load((j / ".hydra/config.yaml").read_text()) for j in job_dirs(sweep)]
    tried = {(c["optimizer"]["lr"], c["model"]["dropout"], c["model"]["hidden_dim"]) for c in configs}
    assert len(tried) == 3  # three different points, each within the search space
    assert all(1 <= lr <= 40 and 0 <= p <= 0.6 and h in (200, 400, 650) for lr, p, h in tried)


def hydra_package(package: str, *overrides: str) -> dict:
    """The composed Hydra config node at ``package`` for these overrides (`--cfg hydra --package`)."""
    proc = lmlab("lmlab.run", *overrides, "--cfg", "hydra", "--package", package, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_grid_preset_sets_the_8_point_grid():
    params = hydra_package("hydra.sweeper", "+sweep=grid_dims")["params"]
    assert params == {"dataset.batch_size": "20,40", "model.hidden_dim": "200,650", "model.embed_dim": "200,650"}


def test_slurm_preset_documents_the_keys():
    launcher = hydra_package("hydra.launcher", "hydra/launcher=slurm")
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["max_num_timeout"] == 3 and launcher["gpus_per_node"] == 1 and launcher["timeout_min"] == 240


JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "~device.num_threads"]


@pytest.mark.parametrize("launcher", [[], pytest.param(JOBLIB, marks=pytest.mark.slow)], ids=["basic", "joblib"])
def test_a_failing_job_is_recorded_and_the_sweep_goes_on(launcher, tmp_path, corpus_dir, capsys):
    sweep_dir = tmp_path / "sweep"
    args = [*SWEEP, f"dataset.path={corpus_dir}", "trainer.epochs=1", "model.hidden_dim=16,-1,24", *launcher]
    proc = lmlab("lmlab.run", "-m", *args, f"hydra.sweep.dir={sweep_dir}", timeout=600)
    assert proc.returncode != 0
    results = {p.parent.name.split("_")[0]: json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")}
    assert results["0"]["status"] == results["2"]["status"] == "completed"  # the jobs after the failure ran
    assert results["1"] == {"status": "failed", "error": results["1"]["error"]}
    assert "model.hidden_dim=-1 is invalid" in results["1"]["error"]
    assert "model.hidden_dim=-1 is invalid" in next(sweep_dir.glob("1_*/error.txt")).read_text()
    assert f"multirun folder: {sweep_dir} (2 finished, 1 failed)" in proc.stdout
    assert any(line.startswith("failed job:") and "hidden_dim=-1" in line for line in proc.stderr.splitlines())
    assert "Traceback" not in proc.stderr
    capsys.readouterr()
    assert compare_main([str(sweep_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["run", "status", "hidden_dim"]
    assert len(table) == 4 and table[-1].split()[1:4] == ["failed", "-1", "FAILED"]  # failed jobs last


@pytest.mark.parametrize("rate, stops", [(0.75, False), (0.0, True)])
def test_optuna_counts_failed_trials_over_the_whole_study(tmp_path, corpus_dir, rate, stops):
    """The plugin's failure rate is per batch (one trial): here it is a share of all n_trials."""
    searched = ("optimizer.lr", "model.dropout", "model.hidden_dim")
    args = [o for o in SWEEP if not o.startswith(searched)]
    command = ["-m", *args, f"dataset.path={corpus_dir}", "+sweep=optuna",
               "hydra.sweeper.n_trials=4", f"hydra.sweeper.max_failure_rate={rate}", "trainer.epochs=1",
               "model.embed_dim=16", "model.hidden_dim=choice(16,-1)",
               "hydra.sweeper.sampler.seed=3", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    done = lmlab("lmlab.run", *command, timeout=600)
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/results.json"))]
    failed = [r for r in results if r["status"] == "failed"]
    assert failed and all("model.hidden_dim=-1 is invalid" in r["error"] for r in failed)
    assert done.returncode == 1  # some trial failed: the sweep says so
    assert f"({len(results) - len(failed)} finished, {len(failed)} failed)" in done.stdout
    if stops:  # no failure allowed: the study ends at the first
        assert len(results) == len(failed) == 1 and "1 of 4 trials failed" in done.stderr
    else:  # every trial ran, failed ones included, and the study reported its best
        assert len(results) == 4 and len(failed) < 4
        best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
        assert best["best_params"]["model.hidden_dim"] == 16
