import pytest
import torch

from lmlab.errors import ConfigError
from lmlab.models import RNNLanguageModel, build_model
from lmlab.models.base import keep_mask


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("tie, embed, hidden", [(True, 16, 16), (True, 16, 24), (False, 16, 24)])
def test_shapes_and_tying(cell, tie, embed, hidden):
    model = RNNLanguageModel(50, cell=cell, embed_dim=embed, hidden_dim=hidden, num_layers=2, tie_weights=tie)
    tokens = torch.randint(0, 50, (7, 3))
    features, state = model(tokens, model.init_state(3))
    assert features.shape == (7, 3, embed if tie else hidden)
    assert len(state) == 2
    assert model.log_probs(features).shape == (7, 3, 50)
    assert torch.allclose(model.log_probs(features).exp().sum(-1), torch.ones(7, 3), atol=1e-5)
    loss = model.loss(features, tokens)
    assert loss.dim() == 0 and loss.item() > 0
    assert (model.decoder.weight is model.embedding.weight) == tie
    if cell == "lstm":
        h, c = state[-1]
        assert h.shape == c.shape == (1, 3, embed if tie else hidden)


def test_tied_gradient_is_dense_and_equals_the_plain_embeddings():
    """A tied model's embedding makes sparse gradients that autograd adds into the decoder's dense one:
    the result must be the same dense gradient as with a plain embedding (so every optimizer works)."""
    torch.manual_seed(0)
    model = RNNLanguageModel(60, embed_dim=8, hidden_dim=8, dropout=0.0)
    assert model.embedding.sparse
    tokens = torch.randint(0, 60, (6, 3))
    grads = []
    for sparse in (True, False):
        model.embedding.sparse = sparse
        model.zero_grad(set_to_none=True)
        features, _ = model(tokens, model.init_state(3))
        model.loss(features, tokens).backward()
        grads.append(model.embedding.weight.grad)
    assert grads[0].layout == torch.strided
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def test_dropout_masks_keep_the_right_share_and_scale():
    torch.manual_seed(0)
    mask = keep_mask((200, 50, 40), 0.3, torch.float32, torch.device("cpu"))
    assert mask.unique().tolist() == pytest.approx([0.0, 1 / 0.7])
    assert (mask > 0).float().mean().item() == pytest.approx(0.7, abs=0.005)
    model = RNNLanguageModel(30, embed_dim=6, hidden_dim=6, dropout=0.5, locked_dropout=True).train()
    dropped = model._drop(torch.ones(9, 4, 6), 0.5)
    assert torch.equal(dropped, dropped[:1].expand(9, 4, 6))  # locked: one mask for all time steps
    shared = RNNLanguageModel(30, embed_dim=6, hidden_dim=6, num_layers=2, dropout=0.5).train()
    masks = shared._shared_masks(torch.zeros(9, 4, dtype=torch.long))  # one draw for the 3 sites on a CPU
    assert len(masks) == 3 and all(m.shape == (9, 4, 6) for m in masks)
    assert not torch.equal(masks[0], masks[1]) and masks[0].unique().tolist() == pytest.approx([0.0, 2.0])
    awd = RNNLanguageModel(30, embed_dim=6, hidden_dim=8, tie_weights=False, dropout=0.5).train()
    assert awd._shared_masks(torch.zeros(9, 4, dtype=torch.long)) == [None] * 3  # widths differ: a draw each


ADAPTIVE = [
    ("rnn", {"embed_dim": 16, "hidden_dim": 24, "tie_weights": False}),
    ("rnn", {"embed_dim": 16, "hidden_dim": 24, "tie_weights": True}),
    ("transformer", {"d_model": 16, "num_heads": 2, "num_layers": 1}),
]


@pytest.mark.parametrize("name, kwargs", ADAPTIVE, ids=["rnn-untied", "rnn-tied", "transformer-tied"])
def test_adaptive_softmax_trains_on_the_distribution_it_reports(name, kwargs):
    """The training loss (rows picked by target cluster) is the mean NLL of the full log-probabilities,
    which sum to one, in value and in gradient; cutoffs past the vocabulary are dropped."""
    torch.manual_seed(0)
    model = build_model(name, 100, softmax="adaptive", adaptive_cutoffs=[10, 40, 500], **kwargs)
    tokens = torch.randint(0, 100, (6, 3))
    targets = torch.tensor([3, 15, 70] * 6).view(6, 3)  # every cluster has targets
    features, _ = model(tokens, model.init_state(3))
    logp = model.log_probs(features)
    assert logp.shape == (6, 3, 100)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(6, 3), atol=1e-4)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).mean()
    loss = model.loss(features, targets)
    assert torch.allclose(loss, nll, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    by_loss = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    by_nll = torch.autograd.grad(nll, params, allow_unused=True)
    for a, b in zip(by_loss, by_nll, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a.to_dense(), b.to_dense(), atol=1e-5)
    assert not model.static_shapes  # no CUDA graph for a step whose rows depend on the targets
    if kwargs.get("tie_weights", True):  # tied: the embedding rows are the output vectors
        assert not any(p is model.embedding.weight for p in model.adaptive.parameters())
        assert model.flops_per_token(targets)["output"] < 2 * 16 * 100  # cheaper than a full softmax


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cell": "rnn"}, "model.cell='rnn' is unknown"),
        ({"hidden_dim": -5}, "model.hidden_dim=-5 is invalid: it must be a positive integer"),
        ({"dropout": 1.0}, r"model.dropout=1.0 is invalid: it must be a number in \[0, 1\)"),
        ({"softmax": "adaptive", "adaptive_cutoffs": [60, 80]}, r"has no cutoff below the vocabulary size \(50\)"),
        ({"softmax": "sampled"}, r"model.softmax='sampled' is invalid: it must be one of \['full', 'adaptive'\]"),
        ({"sparse_embedding": True}, "does nothing for a tied model"),
        ({"hiden_dim": 8}, "model.hiden_dim is not a setting of RNNLanguageModel"),
        ({"embed_dim": {"_target_": "builtins.print"}}, "model.embed_dim=.* is invalid"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_model("rnn", 50, **kwargs)


@pytest.mark.parametrize("name, kwargs", ADAPTIVE, ids=["rnn-untied", "rnn-tied", "transformer-tied"])
def test_every_adaptive_softmax_parameter_gets_a_gradient_when_a_cluster_has_no_target(name, kwargs):
    """DDP (find_unused_parameters=False) fails on a step that leaves a parameter without a gradient."""
    model = build_model(name, 100, softmax="adaptive", adaptive_cutoffs=[10, 40], **kwargs)
    tokens = torch.randint(0, 100, (4, 2))
    features, _ = model(tokens, model.init_state(2))
    loss = model.loss(features, torch.full((4, 2), 3))  # only shortlist targets: both clusters empty
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in torch.autograd.grad(loss, params, allow_unused=True))


@pytest.mark.parametrize("softmax, reason", [("full", None), ("adaptive", "adaptive softmax")])
def test_a_cuda_graph_is_planned_only_for_static_shapes(softmax, reason):
    """The plan is decided from the model's contract (static_shapes), without a GPU."""
    plan = _graph_plan(build_model("rnn", 50, embed_dim=8, hidden_dim=8, softmax=softmax, adaptive_cutoffs=[10]))
    assert plan is None if reason is None else reason in plan


@pytest.mark.parametrize(
    "name, kwargs, captured",
    [
        ("pointer_rnn", {"embed_dim": 8, "hidden_dim": 8, "pointer_window": 4}, True),  # a fixed-size window
        ("transformer", {"d_model": 8, "num_heads": 2, "num_layers": 1}, False),  # its KV cache fills up
        ("pointer_transformer", {"d_model": 8, "num_heads": 2, "num_layers": 1, "pointer_window": 4}, False),
    ],
)
def test_a_cuda_graph_is_planned_only_for_a_state_of_fixed_shape(name, kwargs, captured):
    plan = _graph_plan(build_model(name, 50, **kwargs))
    assert plan is None if captured else "changes shape from window to window" in plan


def _graph_plan(model: torch.nn.Module) -> str | None:
    """The CUDA graph plan for an SGD step of ``model``, decided from its contract, without a GPU."""
    from lmlab.training.cuda_graph import graph_plan

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return graph_plan(
        torch.device("cuda"), model, optimizer, None, variable_bptt=False, loss_scaling=False, compiled=False
    )


@pytest.mark.parametrize("eval_batch", [6, 2])  # larger than training's windows (the buffer grows), the same
def test_the_training_step_after_an_evaluation_can_write_the_kept_logits_buffer(eval_batch):
    # The fused output layer keeps its fp32 logits buffer between calls. Evaluation runs under inference mode;
    # a buffer (or a view of it) made there must still be writable by the training step that reuses it.
    from lmlab.models import output

    output._workspace.clear()
    output._views.clear()
    torch.manual_seed(0)
    model = build_model("rnn", 50, embed_dim=8, hidden_dim=8, dropout=0.0)
    with torch.inference_mode():
        features, _ = model(torch.randint(0, 50, (8, eval_batch)), model.init_state(eval_batch))
        model.loss(features, torch.randint(0, 50, (8, eval_batch)))
    features, _ = model(torch.randint(0, 50, (8, 2)), model.init_state(2))
    model.loss(features, torch.randint(0, 50, (8, 2))).backward()
    assert model.embedding.weight.grad is not None


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("rnn", {"softmax": "full"}),
        ("rnn", {"softmax": "adaptive", "tie_weights": True}),
        ("rnn", {"softmax": "adaptive", "tie_weights": False}),
        ("transformer", {"softmax": "adaptive"}),
        ("transformer", {}),
    ],
)
def test_target_log_probs_are_the_targets_entries_of_log_probs_and_average_to_the_loss(name, kwargs):
    torch.manual_seed(0)
    sizes = {"embed_dim": 16, "hidden_dim": 16} if name == "rnn" else {"d_model": 8, "num_heads": 2, "num_layers": 1}
    model = build_model(name, 100, adaptive_cutoffs=[10, 40], dropout=0.0, **sizes, **kwargs).eval()
    tokens, targets = torch.randint(0, 100, (6, 3)), torch.randint(0, 100, (6, 3))
    features, _ = model(tokens, model.init_state(3))
    picked = model.target_log_probs(features, targets)
    assert picked.shape == (6, 3)
    full = model.log_probs(features).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(picked, full, atol=1e-5)
    assert -picked.mean().item() == pytest.approx(model.loss(features, targets).item(), abs=1e-5)
