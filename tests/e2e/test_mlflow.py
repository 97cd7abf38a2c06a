"""logger=mlflow end to end: a sweep's jobs in MLflow's own store, read back with MLflow's client, and listed by
MLflow's own web UI (started here on 127.0.0.1, looked at in headless Chromium)."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.browser import screenshot
from tests.e2e.test_sweeps import job_dirs, multirun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_sweep_logs_to_mlflow_and_mlflow_ui_lists_its_runs(tmp_path, corpus_dir):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    output = []
    sweep = multirun(tmp_path, corpus_dir, "model.hidden_dim=16,32", "logger=mlflow", "hooks.progress.log_interval=20",
                     output=output)  # fmt: skip
    uri = f"sqlite:///{sweep.resolve() / 'mlflow.db'}"
    assert output[0].stdout.count(f"in {uri} (look: mlflow ui --backend-store-uri {uri})") == 2

    client = MlflowClient(tracking_uri=uri)
    (experiment,) = client.search_experiments(filter_string="name != 'Default'")  # one experiment: the sweep
    assert experiment.name == "_".join(sweep.resolve().parts[-2:])
    runs = {r.data.params["model.hidden_dim"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"16", "32"}
    for hidden, run in runs.items():
        job = next(j for j in job_dirs(sweep) if f"hidden_dim={hidden}" in j.name)
        results = json.loads((job / "results.json").read_text())
        assert run.info.status == "FINISHED" and run.data.params["dataset.batch_size"] == "4"
        assert run.data.metrics["final/best_val_ppl"] == pytest.approx(results["best_val_ppl"])
        epochs = [json.loads(line)["val_ppl"] for line in (job / "metrics.jsonl").read_text().splitlines()]
        history = client.get_metric_history(run.info.run_id, "val/ppl")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(epochs)
        steps = [json.loads(line)["step"] for line in (job / "steps.jsonl").read_text().splitlines()]
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == steps
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"samples.txt", "checkpoints"} <= artifacts

    port, log = _free_port(), open(tmp_path / "mlflow-ui.log", "w")  # a file: a pipe nobody reads fills and blocks it
    ui = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
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
        page = f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}/runs"
        dom = screenshot(page, tmp_path / "mlflow.png", wait_ms=3000)
    finally:
        ui.terminate()
        ui.wait(timeout=30)
        log.close()
    names = [run.info.run_name for run in runs.values()]
    assert all(name in dom for name in names), f"mlflow ui lists none of {names}"
