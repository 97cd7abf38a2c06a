"""Trust at the edges: a refused run touches nothing on disk; a file lmlab is handed chooses no path,
URL or import; damaged input is one line with its exit code."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.commands import lmlab
from tests.conftest import TINY, USER_DIR


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with its bytes' digest (folders: "dir")."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, list[str]]:
    from tests.conftest import write_corpus

    folder = tmp_path_factory.mktemp("finished")
    args = [*TINY, f"dataset.path={write_corpus(folder / 'corpus')}", "trainer.epochs=1"]
    done = lmlab("lmlab.run", *args, f"hydra.run.dir={folder / 'run'}")
    assert done.returncode == 0, done.stderr
    return folder / "run", args


@pytest.mark.parametrize(
    "change, code",
    [
        (["model.hidden_dim=-1"], 2),  # refused by validation
        (["model.hidden_dim=48"], 4),  # another model: its last.pt cannot be resumed
        (["hooks.checkpoint.resume=/nonexistent/last.pt"], 2),
        (["+epochs=3"], 2),  # a key nothing reads
    ],
)
def test_a_refused_run_leaves_a_finished_run_folder_byte_for_byte(finished_run, change, code):
    run, args = finished_run
    before = snapshot(run)
    refused = lmlab("lmlab.run", *args, *change, f"hydra.run.dir={run}")
    assert refused.returncode == code, refused.stderr
    assert refused.stderr.startswith("error: ") and len(refused.stderr.strip().splitlines()) == 1
    assert snapshot(run) == before  # .hydra/ (config, overrides), run.log, metrics: all as they were


def test_a_refused_run_leaves_no_folder_behind_not_even_hydras_dated_one(tmp_path, corpus_dir):
    refused = lmlab("lmlab.run", *TINY, f"dataset.path={corpus_dir}", "model.hidden_dim=0", cwd=tmp_path)
    assert refused.returncode == 2
    assert not (tmp_path / "outputs").exists()
    empty = tmp_path / "made-by-the-user"
    empty.mkdir()
    refused = lmlab("lmlab.run", *TINY, f"dataset.path={corpus_dir}", "model.hidden_dim=0", f"hydra.run.dir={empty}")
    assert refused.returncode == 2 and empty.is_dir() and not any(empty.iterdir())  # there before: kept, as it was


# Records every file opened for writing or created, every file read, and every connection, in a process
# started with this folder on PYTHONPATH (Python's audit hooks: PEP 578); writes them to events.json beside it.
AUDIT = """
import atexit, json, os, sys
_events = []
def _hook(event, args):
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        _events.append(["open", os.path.abspath(os.fsdecode(args[0])), str(args[1])])
    elif event in ("os.mkdir", "os.rename", "os.remove", "socket.connect", "shutil.copyfile"):
        _events.append([event, repr(args)])
sys.addaudithook(_hook)
def _write():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "events.json"), "w") as f:
        f.write(json.dumps(_events))
atexit.register(_write)
"""


def _hostile_records(hostile: Path, url: str) -> dict[str, dict]:
    names = {"train": "/etc/hostname", "valid": "/etc/passwd", "test": "/proc/self/environ"}
    wikitext = {"root": str(hostile), "mirrors": [f"{url}/wikitext-2-v1.zip", f"{url}/files"], "cache": True,
                "batch_size": 4, "eval_batch_size": 4, "bptt": 8}  # fmt: skip
    text = {"_target_": "lmlab.data.LanguageModelData", "cache": True}
    return {
        "absolute file names": {**text, "path": str(hostile), "file_names": names},
        "a system folder": {
            **text,
            "path": "/etc",
            "file_names": {"train": "hostname", "valid": "hosts", "test": "passwd"},
        },
        "/proc": {
            **text,
            "path": "/proc/self",
            "file_names": {"train": "environ", "valid": "environ", "test": "environ"},
        },
        "traversal": {
            **text,
            "path": str(hostile / ".." / ".." / ".." / "etc"),
            "file_names": {"train": "../etc/hostname"},
        },
        "WikiText-2 root and mirrors": {"_target_": "lmlab.data.WikiText2", **wikitext},
        "WikiText-103 root and mirrors": {"_target_": "lmlab.data.WikiText103", **wikitext},
        "_target_ of a callable": {"_target_": "os.system", "command": f"touch {hostile}/pwned"},
        "nested _target_": {"_target_": "lmlab.data.WikiText2", "bptt": {"_target_": "os.system", "command": "id"}},
        "URL as a path": {**text, "path": f"{url}/corpus"},
        "huge batch": {"_target_": "lmlab.data.WikiText2", "eval_batch_size": 2**40, "bptt": 2**40},
        "not a dict": ["lmlab.data.WikiText2"],
    }


@pytest.fixture(scope="module")
def evaluated_checkpoint(tmp_path_factory):
    import torch

    from tests.conftest import train_tiny_run

    folder = tmp_path_factory.mktemp("hostile")
    run, _, _, _ = train_tiny_run(folder)
    return torch.load(run / "checkpoints" / "best.pt", weights_only=True)


# One of each kind in the README's command (a file name, a download, an import, a size); the rest: the slow tier.
FAST_ATTACKS = ("absolute file names", "WikiText-2 root and mirrors", "nested _target_", "huge batch")


@pytest.mark.parametrize(
    "attack",
    [a if a in FAST_ATTACKS else pytest.param(a, marks=pytest.mark.slow) for a in _hostile_records(Path("h"), "x")],
)
def test_a_checkpoints_dataset_record_chooses_no_file_url_or_import(evaluated_checkpoint, tmp_path, attack):
    import json
    import os

    import torch

    from tests.e2e.test_download import FAKE, _zip_bytes

    hostile, user_root, audit = tmp_path / "hostile", tmp_path / "user-data", tmp_path / "audit"
    hostile.mkdir()
    for name in ("train.txt", "valid.txt", "test.txt"):  # the only names a text-folder record may use
        (hostile / f"not-{name}").write_text("secret words\n")
    for folder in ("wikitext-2", "wikitext-103"):  # the user's own data root holds the WikiText files
        (user_root / folder).mkdir(parents=True)
        for name, data in FAKE.items():
            (user_root / folder / name).write_bytes(data * 20)
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT)
    server_dir = tmp_path / "www"
    server_dir.mkdir()
    (server_dir / "wikitext-2-v1.zip").write_bytes(_zip_bytes("wikitext-2"))

    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    hits: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            hits.append(self.path)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(server_dir)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_port}"
    try:
        state = dict(evaluated_checkpoint)
        state["config"] = {**state["config"], "dataset": _hostile_records(hostile, url)[attack]}
        checkpoint = tmp_path / "ckpt" / "best.pt"
        checkpoint.parent.mkdir()
        torch.save(state, checkpoint)
        env = {**os.environ, "LMLAB_DATA_DIR": str(user_root), "LMLAB_CACHE_DIR": str(tmp_path / "cache")}
        done = lmlab(
            "lmlab.evaluate", f"checkpoint={checkpoint}", "device=cpu", "device.num_threads=1", pythonpath=(audit,),
            env=env,
        )  # fmt: skip
    finally:
        httpd.shutdown()
    assert done.returncode in (0, 2, 4), done.stderr
    if done.returncode:
        assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
    events = json.loads((audit / "events.json").read_text())
    touched = [e for e in events if e[0] != "open" and str(hostile) in e[1] or "socket.connect" == e[0]]
    assert not touched and not hits, (touched, hits)
    forbidden = (str(hostile), "/etc/hostname", "/etc/passwd", "/etc/hosts", "/proc/self/environ")
    opened = [e for e in events if e[0] == "open" and e[1].startswith(forbidden)]
    assert not opened, opened
    written = [e[1] for e in events if e[0] == "open" and e[2] not in ("r", "rb")]
    allowed = [str(tmp_path / d) for d in ("ckpt", "cache", "user-data", "audit")]  # the user's folders, the hook's
    assert all(p.startswith((*allowed, "/dev/")) for p in written), written
    assert not (hostile / "pwned").exists() and sorted(p.name for p in hostile.iterdir()) == [
        "not-test.txt", "not-train.txt", "not-valid.txt"
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.conftest import train_tiny_run

    run, corpus, overrides, _ = train_tiny_run(tmp_path_factory.mktemp("damaged"))
    return run / "checkpoints", overrides


def _edited(source: Path, target: Path, edit) -> Path:
    import torch

    state = torch.load(source, weights_only=True)
    edit(state)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target


def _set(**values):
    return lambda state: state.update(values)


RESUME_DAMAGE = {
    "rng": _set(rng="not a state"),
    "epoch": _set(epoch="two"),
    "step": _set(step=-3),
    "global_step": _set(global_step=1.5),
    "best_val_loss": _set(best_val_loss=float("nan")),
    "history": _set(history={"epoch": 1}),
    "loss_sum": _set(loss_sum=None),
    "optimizer_state": _set(optimizer_state={"state": 5, "param_groups": "x"}),
    "ranks": _set(ranks="everyone"),
    "hidden": lambda s: s.update(step=2, hidden=[[__import__("torch").zeros(1, 3, 7)] * 2]),
    "model_state": lambda s: s.pop("model_state"),
    "vocab": _set(vocab="the cat"),
    "weight_average": _set(weight_average={"embedding.weight": __import__("torch").zeros(2)}),
    "averaged_steps": _set(averaged_steps=-1),
    "dropout_scale": _set(dropout_scale=1.5),
}


def _mean(state):
    """A well-formed weight_average for the tiny run's model (tied: decoder.weight is the embedding)."""
    return {k: v.clone() for k, v in state["model_state"].items() if k != "decoder.weight"}


# Fields valid one by one that contradict each other: the field the message must name.
RESUME_CONTRADICTIONS = {
    "a mean counted as 0 steps": (
        lambda s: s.update(weight_average=_mean(s), averaged_steps=0),
        "averaged_steps",
    ),
    "steps counted without a mean": (_set(weight_average=None, averaged_steps=3), "averaged_steps"),
    "more averaged steps than steps": (
        lambda s: s.update(weight_average=_mean(s), averaged_steps=s["global_step"] + 1),
        "averaged_steps",
    ),
}


@pytest.mark.parametrize(
    "edit, field",
    [(edit, field) for field, edit in RESUME_DAMAGE.items()] + list(RESUME_CONTRADICTIONS.values()),
    ids=list(RESUME_DAMAGE) + list(RESUME_CONTRADICTIONS),
)
def test_a_damaged_field_of_a_resumed_last_pt_is_one_line_naming_file_and_field(
    tiny_run, tmp_path, compose_cfg, edit, field
):
    from lmlab.errors import CheckpointError
    from lmlab.job import train_and_report

    folder, overrides = tiny_run
    last = _edited(folder / "last.pt", tmp_path / "run" / "checkpoints" / "last.pt", edit)
    with pytest.raises(CheckpointError) as err:
        train_and_report(compose_cfg([*overrides, "trainer.epochs=2"]), tmp_path / "run")
    message = str(err.value)
    assert str(last) in message and f"'{field}'" in message and "\n" not in message, message


def _huge(state):
    state["model"]["arguments"]["hidden_dim"] = 2**40


LOAD_DAMAGE = {
    "model_state not a dict": (_set(model_state=[1, 2]), "field 'model_state'"),
    "vocabulary not a list": (_set(vocab={"the": 0}), "field 'vocab'"),
    "2**40 units": (_huge, "refused to build the model stored in"),
    "NaN weights": (lambda s: next(iter(s["model_state"].values())).fill_(float("nan")), "non-finite weights"),
    "version as a string": (_set(version="2"), "has checkpoint version '2' (not a number); this lmlab reads 2"),
    "weights of another shape": (
        lambda s: s["model_state"].update({k: v[:1] for k, v in list(s["model_state"].items())[:1]}),
        "does not fit its model",
    ),
}


@pytest.mark.parametrize("case", list(LOAD_DAMAGE))
def test_a_damaged_checkpoint_is_refused_in_one_line(tiny_run, tmp_path, case):
    from lmlab.errors import CheckpointError
    from lmlab.training.checkpoint_format import model_from_checkpoint

    edit, expected = LOAD_DAMAGE[case]
    best = _edited(tiny_run[0] / "best.pt", tmp_path / "best.pt", edit)
    with pytest.raises(CheckpointError) as err:
        model_from_checkpoint(best)  # what generate and evaluate load with
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_generate_and_evaluate_give_a_damaged_checkpoint_one_line_and_exit_4(tiny_run, tmp_path):
    folder, overrides = tiny_run
    corpus = next(o for o in overrides if o.startswith("dataset.path=")).split("=", 1)[1]
    for module, extra, case in (
        ("lmlab.generate", [], "NaN weights"),
        ("lmlab.evaluate", ["dataset=text_dir", f"dataset.path={corpus}"], "2**40 units"),
    ):
        edit, expected = LOAD_DAMAGE[case]
        best = _edited(folder / "best.pt", tmp_path / module / "best.pt", edit)
        done = lmlab(module, f"checkpoint={best}", "device=cpu", *extra)
        assert done.returncode == 4, done.stderr
        assert done.stderr.startswith("error: ") and expected in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.adaptive_cutoffs=[5,3]", "model.adaptive_cutoffs=[5, 3] is invalid"),
        ("model.adaptive_cutoffs=[300]", "has no cutoff below the vocabulary size"),
        ("seed=-1", "seed=-1 is invalid"),
    ],
)
def test_values_that_used_to_pass_validation_and_crash_are_one_line(tmp_path, corpus_dir, override, message):
    args = [*TINY, f"dataset.path={corpus_dir}", "model.softmax=adaptive", "model.tie_weights=false", override]
    done = lmlab("lmlab.run", *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_bench_steps_zero_is_refused_in_one_line(tmp_path, corpus_dir):
    bench = lmlab("lmlab.bench", *TINY, f"dataset.path={corpus_dir}", "bench.steps=0", cwd=tmp_path)
    assert bench.returncode == 2 and bench.stderr.startswith("error: bench.steps=0 is invalid"), bench.stderr
    assert len(bench.stderr.strip().splitlines()) == 1 and not (tmp_path / "outputs").exists()


def test_compare_flags_an_unreadable_run_and_keeps_the_table(finished_run, tmp_path):
    import shutil

    run, _ = finished_run
    for name, text in (
        ("truncated", '{"status": "compl'),
        ("odd", "[1, 2]"),
        ("no-figures", '{"status": "completed"}'),
    ):
        shutil.copytree(run, tmp_path / name, ignore=shutil.ignore_patterns("checkpoints"))
        (tmp_path / name / "results.json").write_text(text)
    shutil.copytree(run, tmp_path / "good", ignore=shutil.ignore_patterns("checkpoints"))
    done = lmlab("lmlab.compare", str(tmp_path))
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()[1:]
    assert len(rows) == 4 and rows[0].startswith("good ")
    assert sorted(r.split()[0] for r in rows if "FAILED" in r) == ["no-figures", "odd", "truncated"]


def test_a_stop_signal_during_validation_stops_it_and_the_resumed_run_redoes_it(tmp_path):
    """Validation (here far longer than training) stops at its next window; last.pt says "all steps of
    epoch 1 done", and the resumed run validates and ends with the figures of a run never stopped."""
    import json
    import signal

    import torch

    from tests.conftest import write_corpus

    corpus = write_corpus(tmp_path / "corpus", valid=6000)
    args = [*TINY, f"dataset.path={corpus}", "trainer.epochs=1", "trainer.limit_train_batches=3",
            "dataset.eval_batch_size=1", "hooks.progress.log_interval=1"]  # fmt: skip
    full = lmlab("lmlab.run", *args, f"hydra.run.dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "lmlab.run", *args, f"hydra.run.dir={cut}"], cwd=USER_DIR, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    for line in proc.stdout:
        if line.startswith("epoch 1 | step 3/3"):  # the last step of epoch 1: validation starts now
            break
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    saved = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["history"]) == (1, 3, [])  # trained, not yet validated
    resumed = lmlab("lmlab.run", *args, f"hydra.run.dir={cut}")
    assert resumed.returncode == 0, resumed.stderr
    figures = [json.loads((run / "results.json").read_text()) for run in (tmp_path / "full", cut)]
    for key in ("best_val_loss", "test_loss"):
        assert figures[1][key] == pytest.approx(figures[0][key], rel=1e-6), key


def test_the_config_stored_in_a_last_pt_sets_nothing_and_prints_no_control_characters(
    tiny_run, tmp_path, compose_cfg, capsys
):
    from lmlab.job import train_and_report

    folder, overrides = tiny_run

    def edit(state):
        optimizer = state["config"]["optimizer"]
        optimizer["momentum"] = 0.99  # a key this run's optimizer config does not have
        optimizer["\x1b]0;owned\x07lr"] = 1  # a terminal escape in a key

    _edited(folder / "last.pt", tmp_path / "run" / "checkpoints" / "last.pt", edit)
    results = train_and_report(compose_cfg([*overrides, "trainer.epochs=2"]), tmp_path / "run")
    printed = capsys.readouterr().out
    assert results["epochs_run"] == 2 and "\x1b" not in printed and "\x07" not in printed
    assert "optimizer.momentum: 0.99 -> None\n" in printed  # reported, not applied (no "(applied)")


def test_a_planted_link_at_the_lock_is_refused_and_its_target_untouched(tmp_path, corpus_dir):
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    victim.write_text("precious\n")
    (run / ".lmlab.lock").symlink_to(victim)
    done = lmlab("lmlab.run", *TINY, f"dataset.path={corpus_dir}", f"hydra.run.dir={run}")
    assert done.returncode == 6 and "cannot be a lock file" in done.stderr, done.stderr
    assert victim.read_text() == "precious\n"


def test_the_same_command_again_keeps_a_finished_run_as_it_was(finished_run):
    run, args = finished_run
    before = snapshot(run)
    again = lmlab("lmlab.run", *args, f"hydra.run.dir={run}")
    assert again.returncode == 0 and f"finished before, kept as it was: {run}" in again.stdout, again.stderr
    assert snapshot(run) == before  # results.json (its speed, its wall time) untouched
