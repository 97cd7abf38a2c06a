"""Evaluation-time methods: the n-gram mixture, neural cache and dynamic evaluation reduce to static at zero
strength, help on repetitive text, leave the checkpoint untouched, refuse bad settings in one line, work for
every model."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from lmlab.data.batching import TokenStream
from lmlab.data.kneser_ney import KneserNey
from lmlab.evaluation.cache import cache_scores, search_cache
from lmlab.evaluation.dynamic import dynamic_loss, gradient_rms
from lmlab.evaluation.methods import target_probs
from lmlab.evaluation.ngram import mixed_loss
from lmlab.job import train_and_report
from lmlab.models import build_model
from lmlab.training.trainer import Trainer
from tests.commands import lmlab
from tests.conftest import TINY, train_tiny_run

ROOT = Path(__file__).resolve().parents[2]
MODELS = {
    "rnn": {"embed_dim": 16, "hidden_dim": 16, "dropout": 0.0},
    "transformer": {"d_model": 16, "num_heads": 2, "num_layers": 1, "dropout": 0.0, "context": 8},
    "pointer_rnn": {"embed_dim": 16, "hidden_dim": 16, "dropout": 0.0, "pointer_window": 10},
    "pointer_transformer": {
        "d_model": 16,
        "num_heads": 2,
        "num_layers": 1,
        "dropout": 0.0,
        "context": 8,
        "pointer_window": 10,
    },
}


def _stream(seed: int = 0) -> TokenStream:
    # Text that repeats itself: exactly where a cache or adaptation should help an untrained model.
    phrase = torch.randint(0, 30, (12,), generator=torch.Generator().manual_seed(seed))
    return TokenStream(phrase.repeat(40), batch_size=2, bptt=6)


@pytest.mark.parametrize("name", MODELS)
def test_zero_strength_equals_static_and_some_strength_helps(name):
    torch.manual_seed(0)
    model = build_model(name, 30, **MODELS[name])
    if hasattr(model, "sentinel"):
        # Where training leaves a pointer's query, not at the pointer Transformer's start near 0: there the
        # sentinel's gradient (proportional to the query) is near 0 too, and dynamic evaluation's RMS rule
        # divides by it.
        torch.nn.init.normal_(model.query.weight, std=0.1)
    stream = _stream()
    static = Trainer().evaluate(model, stream, torch.device("cpu"))
    scores = cache_scores(model, stream, size=50, thetas=[1.0])
    assert scores.loss(1.0, 0.0) == pytest.approx(static, rel=1e-6, abs=1e-6)
    assert scores.loss(1.0, 0.5) < 0.8 * static  # the cache has seen every phrase before
    assert search_cache(scores)[0] <= scores.loss(1.0, 0.5)

    counts = KneserNey(_stream().columns.t().reshape(-1), 30, order=3)  # "trained" on the same phrases
    model_prob = target_probs(model, stream)
    ngram_prob = counts.column_probs(stream.columns)
    assert mixed_loss(model_prob, ngram_prob, 0.0) == pytest.approx(static, rel=1e-6, abs=1e-6)
    assert mixed_loss(model_prob, ngram_prob, 0.5) < 0.5 * static

    rms = gradient_rms(model, _stream(seed=1), batches=5)
    before = [p.detach().clone() for p in model.parameters()]
    assert dynamic_loss(model, stream, rms, lr=0.0, decay=0.02) == pytest.approx(static, rel=1e-6)
    assert dynamic_loss(model, stream, rms, lr=1e-3, decay=0.0) < 0.9 * static
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # a copy adapted


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run, _, _, results = train_tiny_run(tmp_path_factory.mktemp("eval"))
    return run / "checkpoints" / "best.pt", results


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return lmlab("lmlab.evaluate", "device=cpu", *args)


def test_the_cli_reports_each_method_and_leaves_the_checkpoint_untouched(checkpoint, tmp_path):
    path, results = checkpoint
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    reports = {}
    methods = (
        ("static", []), ("ngram", ["ngram.search=true"]), ("cache", ["cache.search=true"]),
        ("dynamic", ["dynamic.stat_batches=5"]),
    )  # fmt: skip
    for method, extra in methods:
        out = tmp_path / f"{method}.json"
        proc = _evaluate(f"checkpoint={path}", f"method={method}", f"output={out}", *extra)
        assert proc.returncode == 0, proc.stderr
        reports[method] = json.loads(proc.stdout.splitlines()[-1])
        assert json.loads(out.read_text()) == reports[method]
        assert reports[method]["tokens_per_sec"] > 0 and reports[method]["method"] == method
    assert reports["static"]["loss"] == pytest.approx(results["test_loss"], rel=1e-4)
    assert {"theta", "lambda", "valid_ppl"} <= set(reports["cache"]["settings"])  # the chosen values
    assert reports["cache"]["loss"] <= reports["static"]["loss"] + 1e-9  # lambda=0 is on the grid
    assert {"lambda", "valid_ppl", "ngram_ppl"} <= set(reports["ngram"]["settings"])
    assert reports["ngram"]["settings"]["valid_ppl"] <= results["best_val_ppl"] * (1 + 1e-6)  # so is the n-gram's
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_a_run_reports_its_test_with_methods_as_evaluate_does(tmp_path, corpus_dir, compose_cfg):
    """``test_with=[ngram, cache]``: each method's test figure beside the plain one, the same as
    ``lmlab.evaluate method=<name>`` gives on the run's best checkpoint afterwards."""
    overrides = [*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=2", "test_with=[ngram,cache]"]
    results = train_and_report(compose_cfg([*overrides, "ngram.search=true"]), tmp_path / "run")
    assert set(results["test_with"]) == {"ngram", "cache"}
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    for method, extra in (("ngram", ["ngram.search=true"]), ("cache", [])):
        proc = _evaluate(f"checkpoint={best}", f"method={method}", f"output={tmp_path / method}.json", *extra)
        assert proc.returncode == 0, proc.stderr
        report, reported = json.loads(proc.stdout.splitlines()[-1]), results["test_with"][method]
        assert reported["loss"] == pytest.approx(report["loss"], rel=1e-6)
        assert results[f"test_ppl_{method}"] == reported["ppl"]
        assert _without_timings(reported["settings"]) == _without_timings(report["settings"])  # the same lambda
    assert results["test_with"]["ngram"]["loss"] < results["test_loss"]  # the n-gram of this small corpus helps
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["test_with"] == results["test_with"]


def _without_timings(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if not k.endswith("_seconds")}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["test_with=[static]"], "test_with=[static]: the plain test is always reported"),
        (["test_with=[magic]"], "test_with=[magic]: not a registered evaluation method; registered: ['cache',"),
        (["test_with=[ngram,ngram]"], "test_with names ngram twice"),
        (["test_with=[ngram]", "ngram.lambda=2"], "ngram.lambda=2 is invalid: it must be a number in [0, 1]"),
        (["+cache.sise=10"], "cache.sise is not a setting of method cache; valid keys: size, theta, lambda, search"),
    ],
)
def test_bad_test_with_settings_are_refused_before_any_work(overrides, message, tmp_path, corpus_dir):
    out = tmp_path / "refused"
    proc = lmlab("lmlab.run", *TINY, f"dataset.path={corpus_dir}", *overrides, f"hydra.run.dir={out}")
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {message}"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=magic"], "method='magic' is not a registered evaluation method; registered: ['cache', 'dynamic'"),
        (["method=cache", "cache.lambda=1.5"], "cache.lambda=1.5 is invalid: it must be a number in [0, 1]"),
        (["method=dynamic", "dynamic.lr=-1"], "dynamic.lr=-1 is invalid: it must be a finite number >= 0"),
        (["method=cache", "cache.size=0"], "cache.size=0 is invalid: it must be a positive integer"),
        (["method=ngram", "ngram.order=0"], "ngram.order=0 is invalid: it must be a positive integer"),
        (["method=ngram", "ngram.order=40"], "ngram.order=40 is too high for a"),
    ],
)
def test_bad_settings_are_refused_in_one_line(overrides, message, checkpoint):
    proc = _evaluate(f"checkpoint={checkpoint[0]}", *overrides)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_awd_finetuning_starts_from_the_given_weights_with_averaging(tmp_path, corpus_dir, compose_cfg):
    tiny = [
        *TINY, f"dataset.path={corpus_dir}", "dataset.batch_size=4", "dataset.bptt=8", "model.embed_dim=16",
        "model.hidden_dim=16", "model.num_layers=2", "optimizer.lr=5", "trainer.epochs=1",
    ]  # fmt: skip
    base = train_and_report(compose_cfg([*tiny, "+experiment=awd_lstm", "trainer.epochs=2"]), tmp_path / "base")
    best = tmp_path / "base" / "checkpoints" / "best.pt"
    refused = compose_cfg([*tiny, "+experiment=awd_lstm_finetune"])
    with pytest.raises(
        Exception, match="hooks.checkpoint.init_from=GIVE-hooks.checkpoint.init_from=PATH/TO/best.pt is not a file"
    ):
        train_and_report(refused, tmp_path / "refused")
    tuned = train_and_report(
        compose_cfg([*tiny, "+experiment=awd_lstm_finetune", f"hooks.checkpoint.init_from={best}"]), tmp_path / "tuned"
    )
    state = torch.load(tmp_path / "tuned" / "checkpoints" / "last.pt", weights_only=True)
    assert state["optimizer_state"]["nt_asgd"]["averaging"] and state["optimizer_state"]["nt_asgd"]["n_averaged"] > 0
    first = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0]) for run in ("base", "tuned")]
    assert first[1]["val_loss"] < first[0]["val_loss"]  # its first epoch starts from the trained weights
    assert tuned["epochs_run"] == 1 and base["epochs_run"] == 2


def test_diverging_dynamic_evaluation_is_an_error_not_a_nan():
    from lmlab.errors import NonFiniteLoss

    torch.manual_seed(0)
    model = build_model("rnn", 30, **MODELS["rnn"])
    rms = gradient_rms(model, _stream(seed=1), batches=5)
    with pytest.raises(NonFiniteLoss, match=r"dynamic evaluation diverged after .* lower dynamic.lr"):
        dynamic_loss(model, _stream(), rms, lr=1e6, decay=0.0)


def test_a_model_with_its_counts_inside_trains_and_its_checkpoint_scores_alone(tmp_path, corpus_dir, compose_cfg):
    """``model=ngram_pointer_lstm``: the n-gram is part of the model; its checkpoint carries the counts, so
    ``lmlab.evaluate`` gives the run's own test figure, and it beats the same model without them."""
    overrides = [*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=2", "model.pointer_window=20"]
    plain = train_and_report(compose_cfg([*overrides, "model=pointer_lstm"]), tmp_path / "plain")
    mixed = train_and_report(compose_cfg([*overrides, "model=ngram_pointer_lstm"]), tmp_path / "mixed")
    assert mixed["test_loss"] < plain["test_loss"]
    best = tmp_path / "mixed" / "checkpoints" / "best.pt"
    proc = _evaluate(f"checkpoint={best}", f"output={tmp_path / 'static'}.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["loss"] == pytest.approx(mixed["test_loss"], rel=1e-6)
