"""The fused output layer + loss (lmlab.models.output) equals the plain PyTorch loss, value and every
gradient, at every logit scale a model can reach: a softmax that saturates must give the saturated
gradient (softmax - onehot, each entry in [-1, 1]), never a larger one.

Reference: the exact loss of the logits the layer computed (in bf16 the GEMM rounds them first), in float64,
with its gradient propagated to the features, weight and bias in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.models import output
from lmlab.models.output import linear_cross_entropy, linear_target_log_probs

VOCAB, WIDTH, CHUNK_ROWS = 300, 16, 8
SCALES = [1.0, 10.0, 50.0, 100.0, 1e3, 1e4]  # the largest |logit|; fp32 p(target) underflows from ~90
ROWS = [CHUNK_ROWS - 1, CHUNK_ROWS, CHUNK_ROWS + 1, 2 * CHUNK_ROWS, 2 * CHUNK_ROWS + 1]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of CHUNK_ROWS rows, so that the row counts sit on both sides of one and two boundaries."""
    monkeypatch.setattr(output, "LOGITS_BUDGET", CHUNK_ROWS * VOCAB)


def _inputs(rows: int, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, WIDTH, generator=g)
    w = 0.1 * torch.randn(VOCAB, WIDTH, generator=g)
    b = 0.1 * torch.randn(VOCAB, generator=g)
    h = h * (scale / (h @ w.t() + b).abs().max())
    y = torch.randint(0, VOCAB, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g)
    return h, w, b, y, upstream


def _reference(h, w, b, y, upstream, dtype, per_token):
    """Value and float64 gradients of the loss at the logits the layer computes in ``dtype``."""
    gemm = (h.to(dtype) @ w.to(dtype).t()).double()  # bf16: rounded as the autocast GEMM rounds them
    logits = (gemm + b.double()).requires_grad_()
    if per_token:
        value = F.log_softmax(logits, -1).gather(1, y.unsqueeze(1)).squeeze(1)
        (value * upstream.double()).sum().backward()
    else:
        value = F.cross_entropy(logits, y)
        value.backward()
    d = logits.grad
    return value.detach(), (d @ w.double(), d.t() @ h.double(), d.sum(0))


def _fused(h, w, b, y, upstream, dtype, per_token):
    h, w, b = (t.clone().requires_grad_() for t in (h, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        value = (linear_target_log_probs if per_token else linear_cross_entropy)(h, w, b, y)
    (value * upstream).sum().backward() if per_token else value.backward()
    return value.detach().double(), (h.grad.double(), w.grad.double(), b.grad.double())


@pytest.mark.parametrize("per_token", [False, True], ids=["mean", "per_token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("scale", SCALES)
def test_fused_loss_and_its_gradients_equal_the_plain_ones(scale, rows, dtype, per_token):
    h, w, b, y, upstream = _inputs(rows, scale, seed=rows)
    want_value, want_grads = _reference(h, w, b, y, upstream, dtype, per_token)
    got_value, got_grads = _fused(h, w, b, y, upstream, dtype, per_token)
    assert torch.allclose(got_value, want_value, rtol=1e-5, atol=1e-4 * max(1.0, scale / 100))
    for name, got, want in zip(("features", "weight", "bias"), got_grads, want_grads, strict=True):
        # Relative to the gradient's own size: each logit's gradient is at most 1 in size, so a wrong
        # backward shows as an error of the order of the gradient itself (or orders above it). fp32 logits
        # of size s are only known to ~s * 2^-24, which moves near-tied probabilities by as much.
        error = (got - want).abs().max().item()
        tolerance = max(1e-4, scale * 2e-7) * max(want.abs().max().item(), 1e-3)
        assert error <= tolerance, f"{name}: off by {error:.3g}"
    if not per_token:  # softmax - onehot sums to 0 over the vocabulary, whatever the scale
        assert abs(got_grads[2].sum().item()) < 1e-5


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_fused_loss_without_gradients_equals_the_plain_one(scale):
    h, w, b, y, upstream = _inputs(2 * CHUNK_ROWS + 1, scale, seed=3)
    plain = F.cross_entropy(F.linear(h.double(), w.double(), b.double()), y)
    with torch.no_grad():
        assert linear_cross_entropy(h, w, b, y).item() == pytest.approx(plain.item(), rel=1e-5)
        per_token = F.log_softmax(F.linear(h.double(), w.double(), b.double()), -1).gather(1, y.unsqueeze(1))
        assert torch.allclose(linear_target_log_probs(h, w, b, y).double(), per_token.squeeze(1), rtol=1e-5)
