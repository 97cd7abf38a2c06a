"""A Kneser-Ney teacher of the softmax (lmlab.models.ngram_teacher): the soft targets it builds without a
(N, V) matrix are the Kneser-Ney distributions (leave-one-out where training), the gradient it gives the
logits is the soft target's, the value and the trained model stay the network's, and an output layer it
cannot teach is refused."""

import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.models import RNNLanguageModel, TransformerLanguageModel, build_model
from lmlab.models.kneser_ney import KneserNey
from lmlab.models.ngram_teacher import NgramTeacher, SoftTargets

V = 40
TRANSFORMER = {"d_model": 16, "num_heads": 2, "num_layers": 1, "ff_dim": 32, "dropout": 0.0, "context": 32}


def _text(n: int = 3000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(6, V, (n,), generator=g)
    for start in range(0, n - 8, 13):
        words[start : start + 4] = torch.tensor([1, 2, 3, 4])
    return words


def _histories(text: torch.Tensor, positions: torch.Tensor, width: int = 3) -> torch.Tensor:
    history = torch.stack([text[positions - width + i] for i in range(width)], 1)
    history[:3, :2] = -1  # a few positions at a column's start: shorter histories
    return history


def test_the_soft_targets_are_the_kneser_ney_distributions():
    text = _text()
    teacher = SoftTargets(text, V, 4)
    positions = torch.arange(10, 2990, 7)
    history, targets = _histories(text, positions), text[positions]
    identity = torch.eye(V, dtype=torch.float64)  # W = I: Wᵀq is q itself
    q = teacher.times(identity, history, targets, leave_one_out=False)
    assert torch.allclose(q, KneserNey(text, V, 4).distribution(history)[0], atol=1e-6)
    held_out = teacher.times(identity, history, targets, leave_one_out=True)
    assert torch.allclose(held_out.sum(1), torch.ones(len(positions), dtype=torch.float64), atol=1e-6)
    p_target = KneserNey(text, V, 4).score(history, targets, leave_one_out=True)[0]
    assert torch.allclose(held_out.gather(1, targets[:, None]).squeeze(1), p_target, atol=1e-6)
    assert (held_out.gather(1, targets[:, None]) < q.gather(1, targets[:, None]) - 1e-3).any()  # it matters


class _TaughtTransformer(NgramTeacher, TransformerLanguageModel):
    """The teacher on a plain softmax, so that the logits' gradient can be read off its bias."""


def test_the_logits_learn_toward_the_soft_target_and_the_loss_stays_the_models():
    torch.manual_seed(0)
    text = _text()
    model = _TaughtTransformer(V, teacher_order=3, teacher_weight=0.4, **TRANSFORMER)
    model.take_corpus(text)
    tokens = text[200:241].view(-1, 1)
    features, _ = model.train()(tokens[:-1], model.init_state(1))
    loss = model.loss(features, tokens[1:])
    loss.backward()
    with torch.no_grad():
        body, history = model.split_history(features)
        p = TransformerLanguageModel.log_probs(model, body).exp().view(40, V)
        q = model._teacher.times(torch.eye(V), history.view(-1, 2), tokens[1:].view(-1), leave_one_out=True)
        onehot = torch.nn.functional.one_hot(tokens[1:].view(-1), V).float()
        want = (p - 0.6 * onehot - 0.4 * q).mean(0)  # d(loss)/d(bias): the soft target's
        plain = -TransformerLanguageModel.log_probs(model, body).view(40, V).gather(1, tokens[1:].view(-1, 1)).mean()
    assert torch.allclose(model.output_bias.grad, want, atol=1e-6)
    assert loss.item() == pytest.approx(plain.item(), abs=1e-6)  # the printed loss is the network's own


def test_the_trained_model_is_the_pointer_network_alone():
    torch.manual_seed(0)
    taught = build_model("taught_pointer_transformer", V, pointer_window=5, teacher_order=3, **TRANSFORMER)
    taught.take_corpus(_text())
    torch.manual_seed(0)
    plain = build_model("pointer_transformer", V, pointer_window=5, **TRANSFORMER)
    assert taught.state_dict().keys() == plain.state_dict().keys()  # the counts are not kept
    plain.load_state_dict(taught.state_dict())
    tokens = _text(30, seed=3).view(-1, 1)
    scores = [m.eval().target_log_probs(m(tokens[:-1], m.init_state(1))[0], tokens[1:]) for m in (taught, plain)]
    assert torch.allclose(scores[0], scores[1], atol=1e-6)


def test_training_with_the_teacher_moves_the_softmax_toward_the_counts():
    text = _text(6000)
    losses = {}
    for weight in (0.0, 0.8):
        torch.manual_seed(0)
        model = build_model("taught_pointer_rnn", V, pointer_window=5, teacher_order=3, teacher_weight=weight,
                            embed_dim=16, hidden_dim=16, dropout=0.0)  # fmt: skip
        model.take_corpus(text)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        columns, state = text.view(4, -1).t(), model.init_state(4)
        for start in range(0, 600, 20):
            features, state = model.train()(columns[start : start + 20], model.detach_state(state))
            model.loss(features, columns[start + 1 : start + 21]).backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():  # the softmax's distribution after a context the counts know, against theirs
            features, _ = model.eval()(columns[1000:1040], model.init_state(4))
            body, history = model.split_history(model._parts(features)[0])
            log_p = RNNLanguageModel.log_probs(model, body).view(-1, V)
            q = model._teacher.times(torch.eye(V), history.reshape(-1, 2), columns[1001:1041].reshape(-1), False)
            losses[weight] = -(q * log_p).sum(1).mean().item()
    assert losses[0.8] < losses[0.0]


def test_an_output_layer_it_cannot_teach_is_refused():
    with pytest.raises(ConfigError, match="needs a full softmax output layer; set model.softmax=full"):
        build_model("taught_pointer_transformer", V, softmax="adaptive", adaptive_cutoffs=[10], **TRANSFORMER)
