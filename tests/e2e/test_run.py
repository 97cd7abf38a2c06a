"""End to end through Hydra: compose + run, the CLIs, and early config errors."""

import json
import os

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from lmlab.errors import ConfigError
from lmlab.job import train_and_report
from lmlab.models import RNNLanguageModel
from tests.commands import lmlab
from tests.conftest import TINY


@pytest.mark.parametrize("model", ["lstm", "gru"])
def test_train_test_generate_writes_every_output(model, corpus_dir, tmp_path, compose_cfg):
    cfg = compose_cfg([*TINY, f"model={model}", f"dataset.path={corpus_dir}", "optimizer.lr=5"])
    out = tmp_path / "run"
    results = train_and_report(cfg, out)

    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in epochs] == [1, 2, 3]
    assert set(epochs[0]) >= {"epoch", "train_loss", "val_loss", "val_ppl", "lr", "tokens_per_sec", "elapsed_s"}
    assert epochs[-1]["val_ppl"] < epochs[0]["val_ppl"]  # it learns
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert results == json.loads((out / "results.json").read_text())
    assert results["best_val_ppl"] == pytest.approx(min(m["val_ppl"] for m in epochs))
    assert results["best_val_ppl"] < 5  # uniform guessing over this 19-word vocabulary gives 19
    assert results["test_ppl"] < 5 and results["epochs_run"] == 3 and results["peak_gpu_mb"] is None
    assert results["peak_rss_mb"] > 0 and results["train_tokens_per_sec"] > 0
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert best["model"] == {"name": "rnn", "arguments": {**best["model"]["arguments"], "cell": model}}
    assert len(best["vocab"]) == 19
    model_params = RNNLanguageModel(19, cell=model, embed_dim=32, hidden_dim=32).parameters()
    assert results["num_params"] == sum(p.numel() for p in model_params)
    assert len((out / "samples.txt").read_text().split()) >= 1
    assert (out / "checkpoints" / "last.pt").is_file()
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_generate_and_evaluate_clis_use_only_the_checkpoint(trained, tmp_path):
    out, corpus_dir, _, results = trained  # the session's tiny run: only read
    ckpt = out / "checkpoints" / "best.pt"

    def generate():  # from another folder, with no dataset around
        args = [f"checkpoint={ckpt}", "num_words=12", "temperature=0.8", "prompt=the cat", "seed=3", "device=cpu"]
        return lmlab("lmlab.generate", *args, cwd=tmp_path)

    gen = generate()
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("the cat") and len(gen.stdout.split()) >= 3
    again = generate()
    assert again.stdout == gen.stdout  # seeded sampling is reproducible

    ev = lmlab(
        "lmlab.evaluate",
        f"checkpoint={ckpt}",
        "dataset=text_dir",
        f"dataset.path={corpus_dir}",
        "dataset.eval_batch_size=4",
        "dataset.bptt=8",
        "device=cpu",
    )
    assert ev.returncode == 0, ev.stderr
    reported = json.loads(ev.stdout.strip().splitlines()[-1])
    assert reported["split"] == "test"
    assert reported["loss"] == pytest.approx(results["test_loss"], rel=1e-5)


def test_cli_run_help_and_cfg_job():
    out = lmlab("lmlab.run", "--cfg", "job", "model=gru")
    assert out.returncode == 0, out.stderr
    assert "cell: gru" in out.stdout and "name: rnn" in out.stdout
    help_text = lmlab("lmlab.run", "--help")
    models = (
        "model: gru, lstm*, ngram_pointer_lstm, ngram_pointer_transformer, pointer_lstm, pointer_transformer, "
        "transformer"
    )
    assert help_text.returncode == 0 and models in help_text.stdout and "+experiment: " in help_text.stdout
    generate = lmlab("lmlab.generate", "--help")  # only the groups generate reads
    assert generate.returncode == 0 and "device: auto*" in generate.stdout and "model:" not in generate.stdout


@pytest.mark.parametrize("args", [["--cfg", "job", "model=gru"], ["model.hidden_dim=-1"]])
def test_a_command_run_from_the_warm_interpreter_answers_as_a_fresh_one(args, tmp_path):
    """tests/commands.py runs most commands in a child forked from a warm interpreter: same answer, byte for
    byte, as a fresh ``python -m`` (its exit code, stdout and stderr)."""
    fresh, warm = (lmlab("lmlab.run", *args, f"hydra.run.dir={tmp_path / 'x'}", fresh=f) for f in (True, False))
    assert (warm.returncode, warm.stdout, warm.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert not (tmp_path / "x").exists() or args[0] == "--cfg"


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.batch_size=-3", "dataset.batch_size=-3 is invalid: it must be a positive integer"),
        ("model.hidden_dim=0", "model.hidden_dim=0 is invalid"),
        ("model.hidden_dim=abc", "model.hidden_dim='abc' is invalid"),
        ("model.dropout=1.5", r"model.dropout=1.5 is invalid: it must be a number in \[0, 1\)"),
        ("optimizer.lr=0", "optimizer.lr=0 is invalid"),
        ("trainer.epochs=0", "trainer.epochs=0 is invalid"),
        ("dataset.bptt=100000", "dataset.bptt=100000 is longer than the data"),
        ("dataset.path=null", "dataset.path is not set"),
        ("device.cpu_heap=fast", r"device.cpu_heap='fast' is invalid: it must be one of \['reuse', 'release'\]"),
        ("model.name=lstmm", "model.name='lstmm' is not a registered model; registered: .*'rnn', 'transformer'"),
        ("trainer.precision=fp8", "trainer.precision='fp8' is invalid: it must be one of"),
        ("generate.top_k=-5", "generate.top_k=-5 is invalid: it must be a positive integer or null"),
        ("scheduler.interval=hourly", "scheduler.interval='hourly' is invalid"),
        ("model.sparse_embedding=maybe", "model.sparse_embedding='maybe' is invalid: it must be true or false"),
    ],
)
def test_bad_config_stops_before_work(override, message, corpus_dir, tmp_path, compose_cfg):
    cfg = compose_cfg([*TINY, f"dataset.path={corpus_dir}", override])
    with pytest.raises(ConfigError, match=message):
        train_and_report(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_option_or_key_is_refused_by_hydra(compose_cfg):
    with pytest.raises(MissingConfigException, match=r"(?s)model/transformer_xl.*Available options"):
        compose_cfg(["model=transformer_xl"])
    with pytest.raises(ConfigCompositionException, match="Could not override 'model.hiden_dim'") as err:
        compose_cfg(["model.hiden_dim=10"])
    assert "not in struct" in str(err.value.__cause__)


def test_cli_reports_config_errors_in_one_line(corpus_dir):
    out = lmlab("lmlab.run", *TINY, f"dataset.path={corpus_dir}", "dataset.bptt=100000")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: dataset.bptt=100000 is longer than the data")
    assert "Traceback" not in out.stderr


def test_tab_completion_lists_group_options():
    env = {**os.environ, "COMP_LINE": "lmlab-run model=g"}
    proc = lmlab("lmlab.run", "-sc", "query=bash", env=env, timeout=120)  # a fresh interpreter: its own environment
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["model=gru"]
