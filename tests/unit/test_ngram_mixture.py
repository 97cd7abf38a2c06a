"""A Kneser-Ney n-gram inside a model (lmlab.models.ngram_mixture): a distribution whose loss is its targets'
log-probability, blind to the words it predicts, the same figures in one window or several, the training
text's positions scored without themselves while training, a gate that learns to trust the counts where
they know the text, and counts that ride in the checkpoint (and a damaged copy of them refused)."""

import math

import pytest
import torch

from lmlab.data.kneser_ney import KneserNey
from lmlab.errors import CheckpointError
from lmlab.models import build_model
from lmlab.models.ngram_mixture import GATE_AT_START
from lmlab.training.checkpoint_format import load_weights

V = 60
BODIES = {  # the Transformer's cache (32) is longer than the tests' texts: one window or several agree
    "rnn": {"embed_dim": 16, "hidden_dim": 16, "dropout": 0.0},
    "transformer": {"d_model": 16, "num_heads": 2, "num_layers": 1, "ff_dim": 32, "dropout": 0.0, "context": 32},
}


def _text(n: int = 4000, seed: int = 0) -> torch.Tensor:
    # repeated phrases among random words: the counts know the phrases, a tiny network does not yet
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(10, V, (n,), generator=g)
    for start in range(0, n - 8, 11):
        words[start : start + 5] = torch.tensor([1, 2, 3, 4, 5])
    return words


def _model(body: str, order: int = 3, text: torch.Tensor | None = None, heads=("pointer", "ngram")) -> torch.nn.Module:
    torch.manual_seed(0)
    window = {"pointer_window": 6} if "pointer" in heads else {}
    model = build_model(body, V, heads=list(heads), ngram_order=order, **window, **BODIES[body])
    model.take_corpus(_text() if text is None else text)
    return model


@pytest.mark.parametrize("heads", [("pointer", "ngram"), ("ngram",)])
@pytest.mark.parametrize("body", BODIES)
def test_a_distribution_whose_loss_is_the_targets_log_probability(body, heads):
    model = _model(body, heads=heads).eval()
    tokens = _text(37, seed=1).view(-1, 1).repeat(1, 3)[:, :3]
    tokens[:, 1] = _text(37, seed=2)
    features, _ = model(tokens[:-1], model.init_state(3))
    log_probs = model.log_probs(features)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(36, 3), atol=1e-5)
    picked = log_probs.gather(-1, tokens[1:].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(model.target_log_probs(features, tokens[1:]), picked, atol=1e-5)
    assert model.loss(features, tokens[1:]).item() == pytest.approx(-picked.mean().item(), abs=1e-5)
    assert model.generate([1, 2], 5, generator=torch.Generator().manual_seed(0))  # samples from it


@pytest.mark.parametrize("body", BODIES)
def test_a_position_never_sees_the_words_after_it(body):
    model = _model(body).eval()
    tokens = _text(20, seed=3).view(-1, 1)
    changed = tokens.clone()
    changed[10:] = (changed[10:] + 7) % V
    scored = [model.target_log_probs(model(t[:-1], model.init_state(1))[0], tokens[1:]) for t in (tokens, changed)]
    assert torch.equal(scored[0][:9], scored[1][:9])  # targets 1 .. 9: their inputs and histories agree


@pytest.mark.parametrize("body", BODIES)
def test_one_window_or_several_give_the_same_figures(body):
    model = _model(body).eval()
    tokens = _text(25, seed=4).view(-1, 1)
    whole = model.target_log_probs(model(tokens[:-1], model.init_state(1))[0], tokens[1:])
    state, parts = model.init_state(1), []
    for start in range(0, 24, 5):  # windows of 5: the history crosses their edges in the state
        features, state = model(tokens[start : start + 5][: 24 - start], model.detach_state(state))
        parts.append(model.target_log_probs(features, tokens[start + 1 : start + 6]))
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5)


def test_training_scores_the_texts_positions_without_themselves():
    text = _text()
    model = _model("rnn", text=text)
    tokens = text[100:131].view(-1, 1)
    counts = KneserNey(text, V, 3)
    for training in (True, False):
        model.train(training)
        features, _ = model(tokens[:-1], model.init_state(1))
        body, history = model._ngram_parts(features)
        p_counts, matched = counts.score(history.view(-1, 2), tokens[1:].view(-1), leave_one_out=training)
        gate = torch.sigmoid(model.ngram_gate_bias[matched]).view(30, 1)  # untrained: the bias alone
        p_body = model.__class__.__mro__[2].target_log_probs(model, body, tokens[1:]).exp()
        want = ((1 - gate) * p_body + gate * p_counts.float().view(30, 1)).log()
        assert torch.allclose(model.target_log_probs(features, tokens[1:]), want, atol=1e-5)
    assert gate.flatten()[0].item() == pytest.approx(GATE_AT_START)


def test_the_gate_learns_to_trust_the_counts_where_they_know_the_text():
    text = _text(6000)
    model = _model("rnn", text=text[:5000]).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    columns = text[:5000].view(4, -1).t()
    state = model.init_state(4)
    for start in range(0, 1200, 20):
        features, state = model(columns[start : start + 20], model.detach_state(state))
        loss = model.loss(features, columns[start + 1 : start + 21])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    held_out = text[5000:].view(-1, 1)
    with torch.no_grad():
        features, _ = model(held_out[:-1], model.init_state(1))
        body, history = model._ngram_parts(features)
        p_counts, matched = model.counts.score(history.view(-1, 2), held_out[1:].view(-1))
        gate = model._log_gates(body, matched.view(-1, 1))[1].exp()
        mixed = -model.target_log_probs(features, held_out[1:]).mean().item()
    # On this text the counts know all there is to know (phrases, then random words): the gate, from
    # GATE_AT_START, hands them most of the mass, and the mixture scores held-out text nearly as well.
    assert gate.mean().item() > 0.5 > GATE_AT_START
    assert math.exp(mixed) < 1.25 * math.exp(-p_counts.log().mean().item())


def test_the_counts_ride_in_the_state_dict_and_a_damaged_copy_is_refused(tmp_path):
    model = _model("transformer").eval()
    weights = model.state_dict()
    assert torch.equal(weights["_extra_state"], _text().int())
    fresh = build_model("ngram_pointer_transformer", V, pointer_window=6, ngram_order=3, **BODIES["transformer"])
    load_weights(tmp_path / "a.pt", fresh, weights)  # no take_corpus: the counts come with the weights
    tokens = _text(12, seed=5).view(-1, 1)
    scored = [m.eval().target_log_probs(m(tokens[:-1], m.init_state(1))[0], tokens[1:]) for m in (model, fresh)]
    assert torch.equal(scored[0], scored[1])
    for damaged, what in ((torch.tensor([1, V], dtype=torch.int32), "outside the vocabulary of 60 words"),
                          (torch.ones(3), "not the 1-D int32 word ids lmlab writes"),
                          (torch.zeros(0, dtype=torch.int32), "is empty: the counts were never taken")):  # fmt: skip
        with pytest.raises(CheckpointError, match=rf"^{tmp_path}/a.pt is damaged: its n-gram's text .*{what}"):
            load_weights(tmp_path / "a.pt", fresh, {**weights, "_extra_state": damaged})


@pytest.mark.parametrize("coupling", [0.0, 0.5, 1.0])
def test_the_loss_is_the_mixtures_and_the_body_learns_its_coupling_share_from_it(coupling):
    model = _model("rnn").train()
    model.ngram_coupling = coupling
    tokens = _text(31, seed=6).view(-1, 1)
    features, _ = model(tokens[:-1], model.init_state(1))
    body = model._ngram_parts(features)[0]
    from_body = model.__class__.__mro__[2].target_log_probs(model, body, tokens[1:])
    loss = model.loss(features, tokens[1:])
    model.ngram_coupling = 1.0
    mixed = model.loss(features, tokens[1:])
    assert loss.item() == pytest.approx(mixed.item(), abs=1e-6)  # the figure is always the mixture's
    weight = model.embedding.weight
    grads = [torch.autograd.grad(value, weight, retain_graph=True)[0] for value in (loss, mixed, -from_body.mean())]
    assert torch.allclose(grads[0], coupling * grads[1] + (1 - coupling) * grads[2], atol=1e-6)
    gate = [torch.autograd.grad(value, model.ngram_gate_bias, retain_graph=True)[0] for value in (loss, mixed)]
    assert torch.allclose(gate[0], gate[1], atol=1e-7)  # the gate learns from the mixture alone
