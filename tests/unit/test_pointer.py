"""The pointer sentinel on an RNN and on a Transformer: a distribution over the vocabulary whose loss is its
targets' log-probability, blind to the words it predicts, the same figures whether a text comes in one window
or several, and a pointer that learns to copy what the same body without it cannot predict."""

import pytest
import torch

from lmlab.models import build_model
from lmlab.models.pointer import GATE_AT_START

# body -> (its arguments at test size); the Transformer's cache (32) is longer than the tests' texts, so
# that one window or several see the same context.
BODIES = {
    "rnn": {"embed_dim": 16, "hidden_dim": 16, "dropout": 0.0},
    "transformer": {"d_model": 16, "num_heads": 2, "num_layers": 1, "ff_dim": 32, "dropout": 0.0, "context": 32},
}


def _model(body: str, window: int = 6, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(f"pointer_{body}", 60, pointer_window=window, **{**BODIES[body], **kwargs})


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_a_distribution_whose_loss_is_the_targets_log_probability(body, softmax):
    model = _model(body, softmax=softmax, adaptive_cutoffs=[10, 30]).eval()
    tokens = torch.randint(0, 60, (12, 3))
    features, _ = model(tokens[:-1], model.init_state(3))
    log_probs = model.log_probs(features)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(11, 3), atol=1e-5)
    picked = log_probs.gather(-1, tokens[1:].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(model.target_log_probs(features, tokens[1:]), picked, atol=1e-5)
    assert model.loss(features, tokens[1:]).item() == pytest.approx(-picked.mean().item(), abs=1e-5)
    gate = model._parts(features)[2]
    # Untrained, the softmax keeps GATE_AT_START once the window is full (more before): the pointer must
    # earn its mass.
    assert gate.min() >= GATE_AT_START - 0.02
    assert torch.allclose(gate[-1], torch.full_like(gate[-1], GATE_AT_START), atol=0.02)
    sampled = model.generate([1, 2, 3], 8, generator=torch.Generator().manual_seed(0))
    assert len(sampled) == 8 and all(0 <= w < 60 for w in sampled)


@pytest.mark.parametrize("body", BODIES)
def test_a_position_never_sees_the_words_after_it(body):
    model = _model(body).eval()
    tokens = torch.randint(0, 60, (10, 2))
    changed = tokens.clone()
    changed[6:] = (changed[6:] + 1) % 60
    a, _ = model(tokens, model.init_state(2))
    b, _ = model(changed, model.init_state(2))
    assert torch.equal(a[:6], b[:6]) and not torch.equal(a[6:], b[6:])


@pytest.mark.parametrize("body", BODIES)
def test_one_window_or_several_give_the_same_figures(body):
    model = _model(body, window=8).eval()  # the window reaches back past the edge of each 5-step BPTT window
    tokens = torch.randint(0, 60, (20, 2))
    whole, _ = model(tokens, model.init_state(2))
    state, parts = model.init_state(2), []
    for start in range(0, 20, 5):
        features, state = model(tokens[start : start + 5], model.detach_state(state))
        parts.append(features)
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5)
    assert model.state_fits(state, 2) and not model.state_fits(state, 3)


def _copy_text(steps: int, seed: int) -> torch.Tensor:
    # Fresh random 5-word phrases, each said three times: nothing to learn but copying.
    g = torch.Generator().manual_seed(seed)
    phrases = torch.randint(2, 60, (steps // 15 + 1, 1, 5), generator=g).expand(-1, 3, -1)
    return phrases.reshape(-1)[:steps]


def _trained_loss(name: str, body: str, **kwargs) -> float:
    torch.manual_seed(0)
    model = build_model(name, 60, **BODIES[body], **kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    text = _copy_text(8000, seed=1).view(4, -1).t()  # 4 columns of contiguous text
    state = model.init_state(4)
    for start in range(0, text.size(0) - 21, 20):
        features, state = model(text[start : start + 20], model.detach_state(state))
        optimizer.zero_grad()
        model.loss(features, text[start + 1 : start + 21]).backward()
        optimizer.step()
    model.eval()
    held_out = _copy_text(600, seed=2).view(4, -1).t()
    with torch.no_grad():
        features, _ = model(held_out[:-1], model.init_state(4))
        return model.loss(features, held_out[1:]).item()


@pytest.mark.parametrize("body", BODIES)
def test_the_pointer_learns_to_copy_what_the_softmax_cannot_predict(body):
    plain, pointer = _trained_loss(body, body), _trained_loss(f"pointer_{body}", body, pointer_window=20)
    assert pointer < 0.9 * plain, (pointer, plain)


@pytest.mark.parametrize("body, typo", [("rnn", "embed_dmi"), ("transformer", "d_modle")])
def test_a_typo_names_the_pointers_keys_and_its_bodys(body, typo):
    from lmlab.errors import ConfigError
    from lmlab.models import check_model_arguments

    with pytest.raises(ConfigError, match=rf"model.{typo} is not a setting of Pointer.*valid keys: pointer_window, "):
        check_model_arguments(f"pointer_{body}", {"pointer_window": 5, typo: 8})
    with pytest.raises(ConfigError, match=r"model.pointer_window=0 is invalid"):
        check_model_arguments(f"pointer_{body}", {"pointer_window": 0})
    built, _ = check_model_arguments(f"pointer_{body}", {"pointer_window": 5, **BODIES[body]})
    assert built.__name__.startswith("Pointer")
