"""What a command tells its user, piece by piece: run.log's copy of the console, progress of a long pass,
``--help``, the ``learned`` bound, and the mode of the files a run writes."""

from __future__ import annotations

import math
import os
import stat
import sys

import pytest

from lmlab.config.help import groups_read, help_text
from lmlab.metrics import LEARNED_MARGIN, no_better_than_uniform
from lmlab.runtime.files import atomic_write_text
from lmlab.runtime.pass_progress import reported
from lmlab.runtime.run_log import RunLog, begin_run_log


def test_run_log_holds_lines_until_the_run_begins_then_copies_stdout_and_stderr(tmp_path, capsys):
    log = tmp_path / "run.log"
    with RunLog(log, prefix="[job 1] "):
        print("[job 1] lmlab run: python -m lmlab.run")
        assert not log.exists()  # held: a run refused now leaves nothing
        begin_run_log()
        print("progress", end="")
        print("\rbar 10%\rbar 20%\rstep 3 done")  # a bar redrawn in place: what is left on screen
        print("error: something", file=sys.stderr)
    print("after the run")  # not the run's
    lines = [line.split("] ", 1)[1] for line in log.read_text().splitlines()]
    assert lines == ["lmlab run: python -m lmlab.run", "step 3 done", "error: something"]
    assert "[job 1] lmlab run" in capsys.readouterr().out  # the console itself is unchanged


def test_a_run_log_never_begun_writes_nothing(tmp_path):
    with RunLog(tmp_path / "run.log"):
        print("a banner line of a run refused next")
    assert not (tmp_path / "run.log").exists()


def test_a_long_pass_reports_by_the_clock_and_a_short_one_says_nothing(capsys):
    assert list(reported(range(5), 5, "validation")) == list(range(5))
    assert capsys.readouterr().out == ""  # well under first_line_s
    list(reported(range(4), 4, "test", first_line_s=0, every_s=0))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" |")[0] for line in lines] == ["test: 1/4 windows", "test: 2/4 windows", "test: 3/4 windows"]
    assert all("ETA " in line for line in lines)


def test_help_lists_the_groups_each_command_reads():
    run, generate, evaluate = groups_read("run"), groups_read("generate"), groups_read("evaluate")
    assert run["model"] == "lstm" and run["experiment"] is None and "sweep" in run
    assert set(generate) == {"generate", "device"}
    assert set(evaluate) == {"dataset", "device", "trainer", "evaluation"}
    assert set(groups_read("bench")) == set(run) - {"sweep"}
    text = help_text("lmlab.generate", "generate", "usage")
    assert "model:" not in text and "device: auto*, cpu" in text and "--cfg job" in text


def test_learned_means_clearly_below_a_uniform_guess():
    vocab = 13_777
    uniform = math.log(vocab)
    assert no_better_than_uniform(uniform, vocab) and no_better_than_uniform(math.log(13_710), vocab)
    assert no_better_than_uniform(uniform - LEARNED_MARGIN + 0.01, vocab) and no_better_than_uniform(math.nan, vocab)
    assert not no_better_than_uniform(uniform - LEARNED_MARGIN - 0.01, vocab)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_mode_a_plain_open_gets(tmp_path, umask, monkeypatch):
    import lmlab.runtime.files

    monkeypatch.setattr(lmlab.runtime.files, "_umask", lambda: umask)
    atomic_write_text(tmp_path / "results.json", "{}")
    plain = tmp_path / "plain"
    old = os.umask(umask)
    try:
        plain.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_the_default_thread_count_leaves_out_the_cores_other_work_keeps_busy(monkeypatch):
    import subprocess

    import lmlab.runtime.cpu_load as cpu_load

    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        cpu_load.restart()
        assert cpu_load.busy_cores() >= 0.6  # the loop's core (other tests may keep more busy)
    finally:
        loop.kill()
    for busy, threads in ((0.0, 2), (0.3, 2), (1.0, 1), (1.8, 1), (3.0, 1)):
        monkeypatch.setattr(cpu_load, "busy_cores", lambda b=busy: b)
        assert cpu_load.free_threads(2) == (threads, busy)
