"""What a user sees: progress on any stream and in the log file, where results went, the checkpoint's own
data for evaluation, no folder left by refused runs, no silently ignored keys, job-prefixed sweep lines."""

import json
import subprocess
import sys

from tests.commands import lmlab
from tests.conftest import TINY, USER_DIR
from tests.e2e.test_trust import snapshot


def test_a_redirected_run_reports_progress_and_where_its_results_are(tmp_path, corpus_dir):
    out = tmp_path / "run"
    run = lmlab(
        "lmlab.run", *TINY, f"dataset.path={corpus_dir}", "hooks.progress.log_interval=20", f"hydra.run.dir={out}"
    )
    assert run.returncode == 0, run.stderr
    progress = [line for line in run.stdout.splitlines() if line.startswith("epoch ")]
    assert len(progress) == 3 * 4  # 88 steps per epoch: steps 20, 40, 60, 80
    assert progress[0].startswith("epoch 1 | step 20/88 | ") and " ms/step | " in progress[0]
    assert " tok/s | loss " in progress[0] and " | ppl " in progress[0]
    # the LR each step took: optimizer=sgd's lr 5 ramps up over 50 steps (step 20 took 20/50 of it), then holds
    assert " | lr 2 | ETA " in progress[0] and " | lr 5 | ETA " in progress[3]
    log = (out / "run.log").read_text()
    assert all(line in log for line in progress) and "[Epoch: 3]" in log
    assert f"run folder: {out}" in run.stdout and f"best checkpoint: {out}/checkpoints/best.pt" in run.stdout
    assert f"results: {out}/results.json" in run.stdout

    evaluated = lmlab("lmlab.evaluate", f"checkpoint={out}/checkpoints/best.pt", "device=cpu")  # no dataset given
    assert evaluated.returncode == 0, evaluated.stderr
    test_loss = json.loads((out / "results.json").read_text())["test_loss"]
    assert abs(json.loads(evaluated.stdout.splitlines()[-1])["loss"] - test_loss) < 1e-5


def test_refused_runs_leave_no_folder_and_keys_that_do_nothing_are_refused(tmp_path, corpus_dir):
    cases = [
        (["model.hidden_dim=-1"], "model.hidden_dim=-1 is invalid"),
        (["+epochs=2"], "+epochs=2 adds a key that nothing reads, so it would do nothing; did you mean trainer.epochs"),
        (["+sweep=grid_dims"], "+sweep=grid_dims only acts in a multirun; add -m"),
    ]  # fmt: skip
    for i, (overrides, message) in enumerate(cases):
        out = tmp_path / f"refused{i}"
        proc = lmlab("lmlab.run", *TINY, f"dataset.path={corpus_dir}", *overrides, f"hydra.run.dir={out}")
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr
        assert not out.exists()


def test_multirun_lines_name_their_job(tmp_path, corpus_dir):
    sweep = tmp_path / "sweep"
    args = [
        *TINY,
        f"dataset.path={corpus_dir}",
        "trainer.epochs=1",
        "model.hidden_dim=16,24",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = lmlab("lmlab.run", "-m", *args)
    assert proc.returncode == 0, proc.stderr
    epoch_lines = [line for line in proc.stdout.splitlines() if "[Epoch: 1]" in line]
    assert [line.split(" [Epoch")[0] for line in epoch_lines] == ["[job 0]", "[job 1]"]
    assert f"multirun folder: {sweep} (2 finished, 0 failed)" in proc.stdout and "best job: " in proc.stdout
    # folder names show what differs between jobs; the constant overrides stay in .hydra/overrides.yaml
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_hidden_dim=16", "1_hidden_dim=24"]
    assert "dataset.bptt=8" in (sweep / "0_hidden_dim=16" / ".hydra" / "overrides.yaml").read_text()

    # Resumed (the same command again), the sweep keeps its finished jobs as they were and reruns the rest.
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    before = snapshot(jobs[0])
    (jobs[1] / "results.json").unlink()  # as if job 1 had been interrupted
    again = lmlab("lmlab.run", "-m", *args)
    assert again.returncode == 0, again.stderr
    assert f"[job 0] finished before, kept as it was: {jobs[0]}" in again.stdout
    assert snapshot(jobs[0]) == before  # results.json figures (tokens/s, wall time) untouched
    assert "[job 1] finished before" not in again.stdout and (jobs[1] / "results.json").is_file()
    assert "(2 finished, 0 failed)" in again.stdout


def test_ctrl_c_in_a_multirun_prints_the_command_that_resumes_the_sweep(tmp_path, corpus_dir):
    import signal
    import time

    sweep = tmp_path / "sweep"
    args = [
        *TINY,
        f"dataset.path={corpus_dir}",
        "trainer.epochs=200",
        "model.hidden_dim=16,24",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmlab.run", "-m", *args], cwd=USER_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(sweep.glob("0_*/metrics.jsonl")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "[job 0] stopped by SIGINT" in stderr and "Resume with:" not in stderr
    command = next(line for line in stdout.splitlines() if line.startswith("Resume the whole sweep with: "))
    assert "python -m lmlab.run -m " in command and "model.hidden_dim=16,24" in command
    assert command.endswith(f"hydra.sweep.dir={sweep}")
    assert (next(sweep.glob("0_*")) / "checkpoints" / "last.pt").is_file()
