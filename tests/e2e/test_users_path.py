"""The path a user walks first: each model option comes with the optimizer it learns with, a run that learned
nothing says so, and what ``test_with`` can refuse is refused before the first step (a method that fails
after training keeps the plain figures)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmlab.compare import main as compare_main
from lmlab.errors import ConfigError, LmlabError
from lmlab.evaluation.methods import METHODS, register_method
from lmlab.factory import build_training_objects, checkpoint_meta
from lmlab.job import train_and_report
from lmlab.loggers import Logger
from lmlab.runtime.run_table import NOT_LEARNED
from tests.conftest import TINY

TRANSFORMERS = ["transformer", "pointer_transformer", "ngram_pointer_transformer"]
RNNS = ["lstm", "gru", "pointer_lstm", "ngram_pointer_lstm"]


def test_every_model_option_has_a_config():
    options = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "model").glob("*.yaml"))
    assert options == sorted(TRANSFORMERS + RNNS)  # a new option joins one of the lists (and the matrix)


@pytest.mark.parametrize("model", TRANSFORMERS)
def test_a_transformer_option_brings_adamw_with_warmup(model, compose_cfg):
    cfg = compose_cfg([f"model={model}"])
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.scheduler is None
    schedule = cfg.hooks.lr_schedule
    assert schedule._target_.endswith("WarmupDecay") and schedule.warmup_steps > 0
    assert schedule.epochs == cfg.trainer.epochs  # the decay ends with the run


@pytest.mark.parametrize("model", RNNS)
def test_a_recurrent_option_gets_sgd_with_a_warm_up(model, compose_cfg):
    cfg = compose_cfg([f"model={model}"])
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.hooks.lr_schedule is None
    assert cfg.optimizer.lr == (5 if model == "gru" else 20)  # a GRU's gates saturate at 20
    assert cfg.scheduler.warmup_steps == 50 and cfg.scheduler._target_.endswith("ReduceLROnPlateau")


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "nt_asgd"])
def test_an_explicit_optimizer_wins_over_the_models_own(optimizer, compose_cfg):
    for overrides in (["model=transformer", f"optimizer={optimizer}"], [f"optimizer={optimizer}", "model=transformer"]):
        cfg = compose_cfg(overrides)
        expected = compose_cfg([f"optimizer={optimizer}"])
        assert cfg.optimizer == expected.optimizer and cfg.scheduler == expected.scheduler
        assert cfg.hooks.lr_schedule is None


def test_a_recipe_keeps_its_own_optimizer(compose_cfg):
    cfg = compose_cfg(["+experiment=cpu_transformer"])
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer.weight_decay == 0.1
    assert cfg.hooks.lr_schedule.decay_start == 0.5 and cfg.hooks.lr_schedule.warmup_steps == 100


def test_the_first_sgd_steps_take_a_share_of_the_lr(corpus_dir, tmp_path, compose_cfg):
    """Through the real loop: with scheduler.warmup_steps=4, step k of the first four moves the weights by
    k/4 of what a step at the full LR would (one step of plain SGD without clipping or momentum)."""
    moves = []
    for warmup in (0, 4):
        one_step = ["trainer.epochs=1", "trainer.limit_train_batches=1", "trainer.clip_grad_norm=null"]
        cfg = compose_cfg([*TINY, f"dataset.path={corpus_dir}", *one_step, f"scheduler.warmup_steps={warmup}"])
        objects = build_training_objects(cfg)
        before = [p.detach().clone() for p in objects.model.parameters()]
        meta = checkpoint_meta(cfg, objects.data.vocab.words)
        objects.trainer.fit(objects.model, objects.data, objects.optimizer, objects.schedule, objects.device,
                            tmp_path / str(warmup), Logger(), meta)  # fmt: skip
        moves.append(
            sum((p.detach() - b).abs().sum().item() for p, b in zip(objects.model.parameters(), before, strict=True))
        )
    assert moves[1] == pytest.approx(moves[0] / 4, rel=1e-4)


# ------------------------------------------------------------------------- a run that learned nothing
def test_a_run_no_better_than_uniform_says_so(corpus_dir, tmp_path, compose_cfg, capsys):
    """Weights scaled up at the start make confident wrong guesses; at a learning rate of 1e-9 it stays so."""
    scale = ["plugins=[my_extensions]", "+hooks.scale._target_=my_extensions.ScaleWeights", "+hooks.scale.factor=8"]
    cfg = compose_cfg([*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=2", "optimizer.lr=1e-9", *scale])
    results = train_and_report(cfg, tmp_path / "run")
    console = capsys.readouterr().out
    assert results["best_val_loss"] >= math.log(19) and results["learned"] is False
    assert "no better than a uniform guess over the 19-word vocabulary" in results["warning"]
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "after 1 epoch" in epochs[0]["warning"] and "optimizer.lr (now 1e-09)" in epochs[0]["warning"]
    assert "warning" not in epochs[1]  # said once, after the first epoch
    lines = [line for line in console.splitlines() if line.startswith("warning: validation perplexity")]
    assert len(lines) == 2  # after epoch 1, and with the final figures
    assert json.loads((tmp_path / "run" / "results.json").read_text())["learned"] is False
    assert compare_main([str(tmp_path / "run")]) == 0
    assert NOT_LEARNED in capsys.readouterr().out


def test_a_run_that_learned_says_nothing(trained, capsys):
    run, _, _, results = trained
    assert results["learned"] is True and "warning" not in results
    capsys.readouterr()
    assert compare_main([str(run)]) == 0
    assert NOT_LEARNED not in capsys.readouterr().out


# ------------------------------------------------------------------- test_with, before and after training
@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["test_with=[ensemble]", "ensemble.members=[/nonexistent/best.pt]"],
            "checkpoint not found: /nonexistent/best.pt",
        ),
        (["test_with=[ensemble]"], "needs other models"),
        (["test_with=[ngram]", "ngram.order=1"], "ngram.order=1 leaves no word of history"),
        (["test_with=[ngram]", "ngram.order=100"], "ngram.order=100 is too high"),
    ],
)
def test_test_with_is_refused_before_the_first_step(overrides, message, corpus_dir, tmp_path, compose_cfg):
    cfg = compose_cfg([*TINY, f"dataset.path={corpus_dir}", *overrides])
    with pytest.raises(LmlabError, match=message.replace("[", r"\[")):
        train_and_report(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained


def test_an_ensemble_member_of_another_vocabulary_is_refused_before_the_first_step(trained, tmp_path, compose_cfg):
    member = trained[0] / "checkpoints" / "best.pt"
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.txt").write_text("a b c d e f g .\n" * 50)
    for split in ("valid", "test"):
        (other / f"{split}.txt").write_text("a b c .\n" * 10)
    cfg = compose_cfg([*TINY, f"dataset.path={other}", "test_with=[ensemble]", f"ensemble.members=[{member}]"])
    with pytest.raises(ConfigError, match="has another vocabulary"):
        train_and_report(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture
def fails_late():
    """An evaluation method that passes every check and fails when it runs, after the training."""

    @register_method("fails_late")
    def method(inputs, **_):
        raise ConfigError("fails_late: broke while scoring")

    yield "fails_late"
    del METHODS["fails_late"]


def test_a_method_that_fails_after_training_keeps_the_plain_figures(
    fails_late, corpus_dir, tmp_path, compose_cfg, capsys
):
    cfg = compose_cfg([*TINY, f"dataset.path={corpus_dir}", "trainer.epochs=1", f"test_with=[{fails_late},ngram]"])
    results = train_and_report(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    assert results["status"] == "completed" and results["test_ppl"] > 0 and results["test_ppl_ngram"] > 0
    assert results["test_with"][fails_late] == {"status": "failed", "error": "fails_late: broke while scoring"}
    assert f"test_ppl_{fails_late}" not in results
    assert f"error: test_with {fails_late} failed: fails_late: broke while scoring" in capsys.readouterr().err


def test_methods_score_a_model_in_the_precision_it_was_tested_in(trained):
    """The ensemble's member figures are each member's own test figure: scored under the same autocast."""
    from lmlab.data.batching import TokenStream
    from lmlab.evaluation.methods import target_probs
    from lmlab.models import TransformerLanguageModel

    torch.manual_seed(0)
    model = TransformerLanguageModel(50, d_model=32, num_heads=2, num_layers=1, context=8).eval()
    stream = TokenStream(torch.randint(0, 50, (160,)), batch_size=4, bptt=8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        state, total, count = model.init_state(4), 0.0, 0
        for window in stream.windows():
            features, state = model(window.inputs, state)
            total += model.loss(features, window.targets).item() * window.targets.numel()
            count += window.targets.numel()
    bf16 = -target_probs(model, stream, dtype=torch.bfloat16).log().mean().item()
    fp32 = -target_probs(model, stream).log().mean().item()
    assert bf16 == pytest.approx(total / count, rel=1e-5)
    assert abs(fp32 - bf16) > 1e-5  # the dtype took effect
