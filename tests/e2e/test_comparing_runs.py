"""Comparing runs, as a researcher does it: one 4-job sweep (batch size × hidden size) logged to every tracker
at once — W&B offline, TensorBoard, MLflow, CSV — then read back by each tracker's own reader, by
``lmlab.compare`` (its page looked at in headless Chromium) and MLflow's own web UI (``mlflow ui``, its runs page
drawn in headless Chromium).

The sweep runs once for the whole test session: the first worker to need it makes it, the others wait and read
it (none of these tests changes it)."""

import csv
import fcntl
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from lmlab.compare import main as compare_main
from tests.browser import open_app, screenshot
from tests.commands import lmlab
from tests.conftest import write_corpus
from tests.e2e.test_sweeps import job_dirs, multirun
from tests.e2e.wandb_records import summarize

TRACKERS = "logger=[wandb,tensorboard,mlflow,csv]"


@pytest.fixture(scope="session")
def sweep(tmp_path_factory, worker_id) -> tuple[Path, str]:
    """(the sweep's folder, the command's stdout), made once for all xdist workers (in the folder they share)."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if worker_id != "master" else shared
    root, said = shared / "tracked-sweep", shared / "tracked-sweep" / "stdout.txt"
    with open(shared / "tracked-sweep.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not said.exists():
            shutil.rmtree(root, ignore_errors=True)  # what a worker that failed half-way left
            root.mkdir()
            output = []
            multirun(root, write_corpus(root / "corpus"), "dataset.batch_size=4,8", "model.hidden_dim=16,32",
                     TRACKERS, "hooks.progress.log_interval=20", output=output)  # fmt: skip
            said.write_text(output[0].stdout)
    return root / "sweep", said.read_text()


def test_the_sweeps_jobs_and_their_wandb_runs(sweep):
    folder, stdout = sweep
    jobs = job_dirs(folder)
    assert [j.name.split("_")[0] for j in jobs] == ["0", "1", "2", "3"]  # job number: names never collide
    records = [yaml.safe_load((j / ".hydra/config.yaml").read_text()) for j in jobs]
    configs = {(r["dataset"]["batch_size"], r["model"]["hidden_dim"]) for r in records}
    assert configs == {(4, 16), (4, 32), (8, 16), (8, 32)}
    for job in jobs:
        assert {"metrics.jsonl", "steps.jsonl", "results.json", "samples.txt", "metrics.csv"} <= {
            p.name for p in job.iterdir()
        }

    said = [line for line in stdout.splitlines() if line.startswith("W&B offline run: ")]
    assert len(said) == 4  # each job says where its W&B run went and how to upload it
    path, command = re.fullmatch(r"W&B offline run: (\S+) \(upload it with: (wandb sync \S+)\)", said[0]).groups()
    assert Path(path).parent.parent in jobs and command == f"wandb sync {path}" and any(Path(path).glob("*.wandb"))
    runs = [summarize(next(j.glob("wandb/offline-run-*/run-*.wandb"))) for j in jobs]
    assert len({r["group"] for r in runs}) == 1 and runs[0]["group"]  # one sweep, one group
    assert len({r["run_id"] for r in runs}) == 4
    assert sorted(r["name"] for r in runs) == sorted(j.name for j in jobs)  # short: the job's folder name
    assert json.loads(runs[0]["config"]["model.hidden_dim"]) == 16  # flattened keys: the swept keys are columns
    assert {"train/loss", "lr", "val/ppl", "val/loss", "epoch"} <= runs[0]["history_keys"]
    val = [json.loads(row["val/ppl"]) for row in runs[0]["history"] if "val/ppl" in row]
    metrics = [json.loads(x)["val_ppl"] for x in (jobs[0] / "metrics.jsonl").read_text().splitlines()]
    assert val == pytest.approx(metrics)

    rows = list(csv.DictReader((jobs[0] / "metrics.csv").read_text().splitlines()))  # logger=csv
    assert [float(r["val_ppl"]) for r in rows if r["kind"] == "epoch"] == pytest.approx(metrics, rel=1e-6)
    steps = [json.loads(x)["step"] for x in (jobs[0] / "steps.jsonl").read_text().splitlines()]
    assert [int(r["step"]) for r in rows if r["kind"] == "step"] == steps


def test_compare_tabulates_and_plots_the_sweep(sweep, tmp_path, capsys):
    folder, _ = sweep
    jobs = job_dirs(folder)
    capsys.readouterr()
    assert compare_main([str(folder), "--format", "csv", "--plot", str(tmp_path / "curves.png")]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
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


def test_compare_answers_a_sweep_with_unfinished_and_failed_runs_in_a_table_a_figure_and_a_page(sweep, tmp_path):
    import matplotlib.image

    runs = tmp_path / "runs"
    shutil.copytree(sweep[0], runs, ignore=shutil.ignore_patterns("checkpoints", "wandb", "tensorboard", "ml*"))
    stopped = runs / "9_stopped"  # a run killed after its first epoch leaves its record and epochs, no results
    shutil.copytree(job_dirs(runs)[0], stopped)
    (stopped / "results.json").unlink()
    (stopped / "metrics.jsonl").write_text((stopped / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    failed = runs / "8_failed"
    failed.mkdir()
    (failed / "results.json").write_text('{"status": "failed", "error": "model.hidden_dim=-1 is invalid"}')

    done = lmlab(
        "lmlab.compare", str(runs), "--plot", str(tmp_path / "runs.svg"), "--html", str(tmp_path / "runs.html")
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


def test_tensorboards_hparams_dashboard_holds_the_sweep(sweep):
    """Each job's settings and final figures, read with TensorBoard's own event reader and its plugin's protobuf,
    as `tensorboard --logdir SWEEP` reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    seen = set()
    for job in job_dirs(sweep[0]):
        events = EventAccumulator(str(job / "tensorboard")).Reload()
        content = events.PluginTagToContent("hparams")
        records = {tag: plugin_data_pb2.HParamsPluginData.FromString(data) for tag, data in content.items()}
        experiment = records["_hparams_/experiment"].experiment
        session = records["_hparams_/session_start_info"].session_start_info
        names = {h.name for h in experiment.hparam_infos}
        assert {"dataset.batch_size", "model.hidden_dim", "optimizer.lr", "seed"} <= names
        metrics = {m.name.tag for m in experiment.metric_infos}
        assert metrics == {"hparams/best_val_ppl", "hparams/test_ppl", "hparams/epochs_run"}
        assert records["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS
        results = json.loads((job / "results.json").read_text())
        assert events.Scalars("hparams/best_val_ppl")[0].value == pytest.approx(results["best_val_ppl"], rel=1e-6)
        seen.add((session.hparams["dataset.batch_size"].number_value, session.hparams["model.hidden_dim"].number_value))
    assert seen == {(4, 16), (4, 32), (8, 16), (8, 32)}  # the swept keys, one pair per job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_holds_the_sweep(sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    folder, stdout = sweep
    uri = f"sqlite:///{folder.resolve() / 'mlflow.db'}"
    assert stdout.count(f"in {uri} (look: mlflow ui --backend-store-uri {uri})") == 4
    client = MlflowClient(tracking_uri=uri)
    (experiment,) = client.search_experiments(filter_string="name != 'Default'")  # one experiment: the sweep
    assert experiment.name == "_".join(folder.resolve().parts[-2:])
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4
    for run in runs:
        job = Path(run.data.tags["lmlab.run_dir"])
        results = json.loads((job / "results.json").read_text())
        config = yaml.safe_load((job / ".hydra/config.yaml").read_text())
        assert run.info.status == "FINISHED" and run.data.params["model.hidden_dim"] == str(
            config["model"]["hidden_dim"]
        )
        assert run.data.metrics["final/best_val_ppl"] == pytest.approx(results["best_val_ppl"])
        epochs = [json.loads(line)["val_ppl"] for line in (job / "metrics.jsonl").read_text().splitlines()]
        history = client.get_metric_history(run.info.run_id, "val/ppl")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(epochs)
        steps = [json.loads(line)["step"] for line in (job / "steps.jsonl").read_text().splitlines()]
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == steps
        assert {"samples.txt", "checkpoints"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow  # another reader of the store the test above reads with MLflow's client (~30 s: the server starts)
def test_mlflow_ui_lists_the_sweeps_runs(sweep, tmp_path):
    from mlflow.tracking import MlflowClient

    folder, _ = sweep
    uri = f"sqlite:///{folder.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    (experiment,) = client.search_experiments(filter_string="name != 'Default'")
    runs = client.search_runs([experiment.experiment_id])
    port, log = _free_port(), open(tmp_path / "mlflow-ui.log", "w")  # a file: a pipe nobody reads fills and blocks it
    ui = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],  # one request at a time is all a test makes
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert ui.poll() is None, (tmp_path / "mlflow-ui.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "mlflow ui did not answer in 180 s"
                time.sleep(0.5)
        # The runs page as a user sees it, drawn by MLflow's own web app in headless Chromium.
        names = [run.info.run_name for run in runs]
        png = tmp_path / "mlflow-runs.png"
        text = open_app(f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs", png, names)
    finally:
        ui.terminate()
        ui.wait(timeout=30)
        log.close()
    assert all(name in text for name in names) and f"{len(names)} matching runs" in text
    assert png.stat().st_size > 20_000  # a drawn page, not a blank one


def test_compare_keeps_a_mixed_folder_readable(tmp_path, corpus_dir):
    """An LSTM and a Transformer (each with settings the other lacks), a failed job and an interrupted run: one
    column per key that varies, short names, no ``key=-`` padding, rows a laptop screen holds."""
    from tests.conftest import TINY
    from tests.e2e.test_transformer import TRANSFORMER

    runs = tmp_path / "runs"
    for name, args in (("lstm", TINY), ("transformer", TRANSFORMER)):
        done = lmlab(
            "lmlab.run", *args, f"dataset.path={corpus_dir}", "trainer.epochs=1", f"hydra.run.dir={runs / name}"
        )
        assert done.returncode == 0, done.stderr
    shutil.copytree(runs / "lstm", runs / "stopped")
    (runs / "stopped" / "results.json").unlink()
    (runs / "failed").mkdir()
    (runs / "failed" / "results.json").write_text('{"status": "failed", "error": "model.hidden_dim=-1 is invalid"}')
    page = tmp_path / "mixed.html"
    done = lmlab("lmlab.compare", str(runs), "--plot", str(tmp_path / "mixed.png"), "--html", str(page))
    assert done.returncode == 0, done.stderr
    header, *table = done.stdout.splitlines()
    assert "=-" not in done.stdout  # a key the other model lacks is a blank cell, not key=- padding
    assert {"d_model", "hidden_dim"} <= set(header.split()) and max(map(len, done.stdout.splitlines())) <= 200
    assert sorted(row.split()[1] for row in table) == ["completed", "completed", "failed", "unfinished"]
    assert (tmp_path / "mixed.png").stat().st_size > 10_000
    dom = screenshot(page.as_uri(), tmp_path / "mixed-page.png")  # the page as a browser shows it
    assert dom.count("<tr class=") == 4 and "d_model" in dom and "hidden_dim" in dom and "<svg" in dom
