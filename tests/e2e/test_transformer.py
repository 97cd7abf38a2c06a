"""The decoder-only Transformer: causal, KV-cached generation equal to recomputation, learns, round-trips."""

import pytest
import torch

from lmlab.job import train_and_report
from lmlab.models import TransformerLanguageModel, build_model
from lmlab.training.checkpoint_format import model_from_checkpoint
from lmlab.training.trainer import Trainer
from tests.conftest import TINY

TRANSFORMER = [
    *(o for o in TINY if not o.startswith("model.")),
    "model=transformer",
    "model.d_model=32",
    "model.num_heads=2",
    "model.num_layers=2",
    "model.dropout=0.0",
    "model.context=16",
    "optimizer=adamw",
    "optimizer.lr=0.01",
]


def _model(**kwargs) -> TransformerLanguageModel:
    torch.manual_seed(0)
    settings = {"d_model": 32, "num_heads": 4, "num_layers": 2, "dropout": 0.0, "context": 24, **kwargs}
    return build_model("transformer", 40, **settings).eval()


@pytest.mark.parametrize("with_cache", [False, True])
def test_changing_a_later_token_never_changes_earlier_outputs(with_cache):
    model = _model()
    tokens = torch.randint(0, 40, (12, 3))
    _, cache = model(torch.randint(0, 40, (5, 3)), None) if with_cache else (None, None)
    changed = tokens.clone()
    changed[7] = (changed[7] + 1) % 40
    before, _ = model(tokens, cache)
    after, _ = model(changed, cache)
    assert torch.equal(before[:7], after[:7])
    assert not torch.allclose(before[7:], after[7:])


def test_windows_with_the_cache_equal_one_long_window():
    """Within ``context``, reading a column in windows (as training and evaluation do) gives the same
    features as reading it at once: the cache is exact look-back, not an approximation."""
    model = _model()
    tokens = torch.randint(0, 40, (20, 2))
    whole, _ = model(tokens, None)
    first, cache = model(tokens[:8], None)
    second, cache = model(tokens[8:], cache)
    assert torch.allclose(torch.cat([first, second]), whole, atol=1e-5)
    assert cache[0][0].shape == (2, 4, 20, 8)  # (batch, heads, positions kept, head_dim)


def test_kv_cache_generation_equals_full_recomputation():
    model = _model()
    prompt, steps = [3, 1, 4, 1, 5], 12
    cached = model.generate(prompt, steps, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(7))
    generator, ids = torch.Generator().manual_seed(7), list(prompt)
    for _ in range(steps):  # no cache: the whole sequence again at every step
        features, _ = model(torch.tensor(ids).view(-1, 1), None)
        logits = model.log_probs(features[-1, 0]).float() / 0.9
        logits = logits.masked_fill(logits < torch.topk(logits, 10).values[-1], float("-inf"))
        ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)))
    assert cached == ids[len(prompt) :]


def test_the_cache_keeps_only_context_positions():
    model = _model(context=6)
    _, cache = model(torch.randint(0, 40, (10, 1)), None)
    _, cache = model(torch.randint(0, 40, (1, 1)), cache)
    assert all(k.size(2) == v.size(2) == 6 for k, v in cache)


def test_trains_through_the_same_trainer_and_round_trips(corpus_dir, tmp_path, compose_cfg):
    out = tmp_path / "run"
    results = train_and_report(compose_cfg([*TRANSFORMER, f"dataset.path={corpus_dir}"]), out)
    assert results["best_val_ppl"] < 8  # uniform over the 19-word vocabulary is 19
    model, _, state = model_from_checkpoint(out / "checkpoints" / "best.pt")
    assert isinstance(model, TransformerLanguageModel) and state["model"]["name"] == "transformer"
    data_cfg = compose_cfg([*TRANSFORMER, f"dataset.path={corpus_dir}"])
    from lmlab.data.rebuild import build_dataset

    data = build_dataset(data_cfg.dataset)
    test_loss = Trainer().evaluate(model, data.stream("test"), torch.device("cpu"))
    assert test_loss == pytest.approx(results["test_loss"], rel=1e-5)


def test_bad_settings_are_refused():
    from lmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="must split into model.num_heads=3 heads of even size"):
        build_model("transformer", 40, d_model=32, num_heads=3)
    with pytest.raises(ConfigError, match="model.context=0 is invalid: it must be a positive integer"):
        build_model("transformer", 40, context=0)
