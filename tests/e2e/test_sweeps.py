"""Hydra multirun sweeps (sequential, joblib, submitit_local, Optuna), W&B offline, lmlab.compare."""

import csv
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from lmlab.compare import main as compare_main
from tests.browser import screenshot
from tests.commands import lmlab
from tests.conftest import TINY
from tests.e2e.wandb_records import summarize

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


def test_sequential_grid_with_wandb_offline_and_compare(tmp_path, corpus_dir, capsys):
    output = []
    sweep = multirun(
        tmp_path,
        corpus_dir,
        "dataset.batch_size=4,8",
        "model.hidden_dim=16,32",
        "logger=wandb",
        "hooks.progress.log_interval=20",
        output=output,
    )
    jobs = job_dirs(sweep)
    assert len(jobs) == 4
    said = [line for line in output[0].stdout.splitlines() if line.startswith("W&B offline run: ")]
    assert len(said) == 4  # each job says where its W&B run went and how to upload it
    folder, command = re.fullmatch(r"W&B offline run: (\S+) \(upload it with: (wandb sync \S+)\)", said[0]).groups()
    assert (
        Path(folder).parent.parent in jobs and command == f"wandb sync {folder}" and any(Path(folder).glob("*.wandb"))
    )
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1", "2", "3"]  # job number: names never collide
    configs = {
        (
            yaml.safe_load((j / ".hydra/config.yaml").read_text())["dataset"]["batch_size"],
            yaml.safe_load((j / ".hydra/config.yaml").read_text())["model"]["hidden_dim"],
        )
        for j in jobs
    }
    assert configs == {(4, 16), (4, 32), (8, 16), (8, 32)}
    for job in jobs:
        assert {"metrics.jsonl", "results.json", "samples.txt"} <= {p.name for p in job.iterdir()}

    runs = [summarize(next(j.glob("wandb/offline-run-*/run-*.wandb"))) for j in jobs]
    assert len({r["group"] for r in runs}) == 1 and runs[0]["group"]  # one sweep, one group
    assert len({r["run_id"] for r in runs}) == 4
    assert "model.hidden_dim=16" in runs[0]["name"] and "dataset.batch_size=4" in runs[0]["name"]
    assert json.loads(runs[0]["config"]["model.hidden_dim"]) == 16  # flattened keys
    assert {"train/loss", "lr", "val/ppl", "val/loss", "epoch"} <= runs[0]["history_keys"]
    val = [json.loads(row["val/ppl"]) for row in runs[0]["history"] if "val/ppl" in row]
    metrics = [json.loads(x)["val_ppl"] for x in (jobs[0] / "metrics.jsonl").read_text().splitlines()]
    assert val == pytest.approx(metrics)

    capsys.readouterr()
    assert compare_main([str(sweep), "--format", "csv", "--plot", str(tmp_path / "curves.png")]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == 4
    expected = sorted(json.loads((j / "results.json").read_text())["best_val_ppl"] for j in jobs)
    assert [float(row["best_val_ppl"]) for row in table] == pytest.approx(expected, abs=0.01)  # best first
    assert {row["run"] for row in table} == {j.name for j in jobs}
    assert list(table[0])[:4] == ["run", "status", "batch_size", "hidden_dim"]  # the swept keys, by their last part
    assert {(row["batch_size"], row["hidden_dim"]) for row in table} == {
        ("4", "16"),
        ("4", "32"),
        ("8", "16"),
        ("8", "32"),
    }
    assert "embed_dim" not in table[0] and {row["status"] for row in table} == {"completed"}
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_fills_tensorboards_hparams_dashboard(tmp_path, corpus_dir):
    """Each job writes its settings and final figures through TensorBoard's HParams plugin; read back with
    TensorBoard's own event reader and its plugin's protobuf, as `tensorboard --logdir SWEEP` reads them."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    sweep = multirun(tmp_path, corpus_dir, "dataset.batch_size=4,8", "logger=tensorboard")
    seen = {}
    for job in job_dirs(sweep):
        events = EventAccumulator(str(job / "tensorboard")).Reload()
        content = events.PluginTagToContent("hparams")
        records = {tag: plugin_data_pb2.HParamsPluginData.FromString(data) for tag, data in content.items()}
        experiment = records["_hparams_/experiment"].experiment
        session = records["_hparams_/session_start_info"].session_start_info
        assert {"dataset.batch_size", "model.hidden_dim", "optimizer.lr", "seed"} <= {
            h.name for h in experiment.hparam_infos
        }
        assert {m.name.tag for m in experiment.metric_infos} == {
            "hparams/best_val_ppl",
            "hparams/test_ppl",
            "hparams/epochs_run",
        }
        assert records["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS
        results = json.loads((job / "results.json").read_text())
        assert events.Scalars("hparams/best_val_ppl")[0].value == pytest.approx(results["best_val_ppl"], rel=1e-6)
        seen[session.hparams["dataset.batch_size"].number_value] = session.hparams["model.hidden_dim"].number_value
    assert seen == {4.0: 32.0, 8.0: 32.0}  # the swept key, one value per job


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


def test_compare_answers_a_sweep_with_unfinished_and_failed_runs_in_a_table_a_figure_and_a_page(tmp_path, corpus_dir):
    import matplotlib.image

    sweep = multirun(tmp_path, corpus_dir, "dataset.batch_size=4,8", "model.hidden_dim=16,32",
                     "hooks.progress.log_interval=10")  # fmt: skip
    stopped = sweep / "9_stopped"  # a run killed after its first epoch leaves its record and epochs, no results
    shutil.copytree(job_dirs(sweep)[0], stopped, ignore=shutil.ignore_patterns("checkpoints"))
    (stopped / "results.json").unlink()
    (stopped / "metrics.jsonl").write_text((stopped / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    failed = sweep / "8_failed"
    failed.mkdir()
    (failed / "results.json").write_text('{"status": "failed", "error": "model.hidden_dim=-1 is invalid"}')

    done = lmlab(
        "lmlab.compare", str(sweep), "--plot", str(tmp_path / "runs.svg"), "--html", str(tmp_path / "runs.html")
    )
    assert done.returncode == 0, done.stderr
    header, *table = done.stdout.splitlines()
    assert header.split()[:4] == ["run", "status", "batch_size", "hidden_dim"] and "=-" not in done.stdout
    assert [row.split()[1] for row in table] == ["completed"] * 4 + ["unfinished", "failed"]
    assert "unfinished at epoch 1" in table[4] and table[5].split()[2:4] == ["FAILED", "-"]
    assert (tmp_path / "runs.svg").read_text().lstrip().startswith("<?xml")

    page = (tmp_path / "runs.html").read_text()
    assert not re.findall(r"""(?:src|href|url)\s*[=(]\s*["']?(?:https?:|//)""", page)  # nothing to fetch
    dom = screenshot((tmp_path / "runs.html").as_uri(), tmp_path / "shot.png")
    assert dom.count("<tr class=") == 6 and "batch_size" in dom and "<svg" in dom
    shot = matplotlib.image.imread(tmp_path / "shot.png")[..., :3]
    coloured = (shot.max(axis=2) - shot.min(axis=2)) > 0.3  # plot lines and markers; the table is grey on white
    rows_of_colour = coloured.any(axis=1).nonzero()[0]
    assert coloured.sum() > 2000 and rows_of_colour.min() > 150, "the screenshot shows no figure below the table"
    greyish = (abs(shot - 0.94) < 0.03).all(axis=2).sum()  # the table's header cells (#f0f0f0)
    assert greyish > 5000, "the screenshot shows no table"
