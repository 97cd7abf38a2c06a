"""Every option of ``conf/model/`` learns with the defaults it gets: its real default sizes, the optimizer and
schedule its config brings, the default batch (20 × 35 words), on real text (wt2-small), for three seeds (the
README's command: the LSTM and the Transformer, one seed; CI's slow tier: the rest).

The bound: after a few steps (10 for the recurrent options, 20 for the Transformers, whose AdamW moves each
weight by about its LR per step), with the LR still warming up, the validation loss is at least half a nat
below ln V, the loss of a uniform guess over the V-word vocabulary (a perplexity under V / 1.65). A model
whose gradients are wrong or whose learning rate is far too high ends above ln V (it diverges to perplexities
of 1e5 to 1e13); one that learns is on its way to the words' frequencies, which alone are worth about 2.7
nats on this text. The figures this bound was chosen from: experiments/defaults.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lmlab.config import CONF_DIR
from lmlab.factory import build_training_objects, checkpoint_meta
from lmlab.loggers import Logger

EVAL_BATCHES = 5
SEEDS = [1111, *(pytest.param(seed, marks=pytest.mark.slow) for seed in (1, 2))]  # more seeds: CI's slow tier
# The README's command: the default (lstm) and the Transformer, one of each body. The GRU (the LSTM's loop with
# another cell) and the composite options (a pointer or an n-gram mixed into one of those bodies, trained by the
# same loop) are variants, run with the other seeds in CI's slow tier.
BASE_MODELS = ("lstm", "transformer")
MODELS = [
    name if name in BASE_MODELS else pytest.param(name, marks=pytest.mark.slow)
    for name in sorted(p.stem for p in Path(CONF_DIR, "model").glob("*.yaml"))
]


def _best_val_loss(overrides: list[str], out: Path) -> tuple[float, int]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("run", overrides=overrides)
    GlobalHydra.instance().clear()
    objects = build_training_objects(cfg)
    fit = objects.trainer.fit(
        objects.model, objects.data, objects.optimizer, objects.schedule, objects.device, out, Logger(),
        checkpoint_meta(cfg, objects.data.vocab.words),
    )  # fmt: skip
    return fit.best_val_loss, len(objects.data.vocab)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_option_learns_with_its_defaults(model, seed, shared_data, tmp_path):
    overrides = [
        f"model={model}", f"seed={seed}", "dataset=text_dir", f"dataset.path={shared_data / 'wt2-small'}",
        "device=cpu", "trainer.epochs=1", f"trainer.limit_train_batches={20 if 'transformer' in model else 10}",
        f"trainer.limit_eval_batches={EVAL_BATCHES}", "hooks.progress.bar=false",
    ]  # fmt: skip
    loss, vocab = _best_val_loss(overrides, tmp_path)
    assert loss < math.log(vocab) - 0.5, f"model={model} seed={seed}: val loss {loss:.3f}, ln V {math.log(vocab):.3f}"
