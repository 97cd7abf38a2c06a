"""What a run says from its first second: the start banner before any step, progress by the clock on a slow
model, and run.log holding every console line, a stop and its resume included."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.commands import lmlab
from tests.conftest import TINY, USER_DIR

BANNER = ("lmlab run: ", "run folder: ", "device: ", "data: ", "model: ", "plan: ")


def _read_lines(proc: subprocess.Popen, until: str, timeout: float) -> list[tuple[float, str]]:
    """(seconds since start, line) of stdout up to and including the first line starting with ``until``."""
    started, lines = time.monotonic(), []
    deadline = started + timeout
    for line in proc.stdout:
        lines.append((time.monotonic() - started, line.rstrip("\n")))
        if line.startswith(until):
            return lines
        assert time.monotonic() < deadline, f"no {until!r} line in {timeout} s: {lines}"
    raise AssertionError(f"the run ended before a {until!r} line: {lines} {proc.stderr.read()}")


def test_a_default_run_prints_its_banner_first_and_progress_within_seconds_of_its_first_step(
    shared_data, tmp_path, compose_cfg
):
    """The default model (2x650 LSTM, ~1 s a step on two cores) on real text, output redirected: the banner,
    then a progress line by the clock long before the 200th step. (The clock's first line comes 10 s after the
    first step by default, checked below; this run asks for 3 s, to be done sooner.)"""
    assert compose_cfg([]).hooks.progress.first_line_s == 10
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmlab.run", "dataset=text_dir", f"dataset.path={shared_data / 'wt2-small'}",
         "hooks.progress.first_line_s=3", f"hydra.run.dir={out}"],
        cwd=USER_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        lines = _read_lines(proc, "epoch 1 | step ", timeout=240)
    finally:
        proc.kill()  # what it does next is not this test's
        proc.communicate(timeout=60)
    texts = [text for _, text in lines]
    assert [t.split(":")[0] + ": " for t in texts[:6]] == list(BANNER), texts  # the banner, in order, first
    assert "vocabulary 13,777" in texts[3] and "model: rnn, cell lstm" in texts[4] and "parameters" in texts[4]
    assert "311 steps (batch 20 x 35 tokens)" in texts[5] and "Ctrl-C" in texts[5]
    step = int(re.search(r"step (\d+)/", texts[-1]).group(1))
    ms_per_step = float(re.search(r"([\d.]+) ms/step", texts[-1]).group(1))
    assert step < 200  # it came by the clock, not by the 200-step interval
    # the steps it reports took about 3 s (a step's own time may overshoot it, more so on a loaded machine)
    assert step * ms_per_step / 1000 <= 3 + 2 * ms_per_step / 1000 + 1, texts[-1]


def test_run_log_holds_every_console_line_of_a_stopped_and_resumed_run(tmp_path, corpus_dir):
    out = tmp_path / "run"
    args = [*TINY, f"dataset.path={corpus_dir}", "hooks.progress.log_interval=10", f"hydra.run.dir={out}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmlab.run", *args, "trainer.epochs=200"],
        cwd=USER_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = [text for _, text in _read_lines(proc, "[Epoch: 1]", timeout=120)]
    proc.send_signal(signal.SIGINT)
    rest, stopped_err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped by SIGINT" in stopped_err, stopped_err
    assert "Resume with: python -m lmlab.run" in stopped_err and (out / "checkpoints" / "last.pt").is_file()
    resumed = lmlab("lmlab.run", *args, "trainer.epochs=2")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout

    logged = [re.sub(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ", "", line) for line in _lines(out / "run.log")]
    console = [
        *first,
        *(line for text in (rest, stopped_err, resumed.stdout, resumed.stderr) for line in _lines_of(text)),
    ]
    missing = [line for line in console if line not in logged]
    assert not missing, missing
    for text in ("lmlab run: ", "Ctrl-C: finishing this step", "stopped by SIGINT", "Resume with: ", "Resuming from "):
        assert any(line.startswith(text) for line in logged), text


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _lines_of(text: str) -> list[str]:
    return [line.rsplit("\r", 1)[-1] for line in text.splitlines() if line.strip()]
