"""Output layer + cross-entropy in row chunks, without ever holding the full (tokens × vocab) logits.

At vocabulary 33k a BPTT batch of 700 tokens has 23 M logits; the usual ``F.cross_entropy(linear(h))``
keeps the logits, their log-softmax and their gradient alive at once (~280 MB fp32). Here each chunk's
logits are made, turned into loss and gradients, and dropped: the gradients w.r.t. the features,
weight and bias are computed in the forward pass (the loss is the last op, so its upstream gradient is
a scalar that backward only multiplies in). Same three matrix products as the plain version, so no
extra FLOPs; peak memory is one chunk of logits.

Per chunk the logits pass through memory once more after their GEMM: an in-place softmax (PyTorch's
row kernel: max, exp and sum while the row is in cache). The one-hot part of ``softmax - onehot`` and
the ``1/n`` of the mean are applied to the small products, not to the (rows × vocab) block.
"""

from __future__ import annotations

import torch

# Logits per chunk: 24 MiB in fp32 — big enough for efficient GEMMs, and under glibc's 32 MiB mmap
# ceiling, so the buffer is recycled from the heap instead of page-faulted in fresh at every chunk.
CHUNK_ELEMENTS = 6 << 20
# Below this a float32 probability has lost precision (subnormal from 1.2e-38): -log p is not trusted.
TINY_PROBABILITY = 1e-30


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits (rows, vocab)."""
    logits = (h @ weight.t()).float()
    if bias is not None:
        logits += bias
    return logits


def _row_chunks(n_rows: int, vocab_size: int) -> list[slice]:
    """Equal row chunks of at most CHUNK_ELEMENTS logits (700 rows → 350 + 350, not 457 + 243)."""
    n_chunks = -(-n_rows * vocab_size // CHUNK_ELEMENTS)
    rows = max(1, -(-n_rows // max(n_chunks, 1)))
    return [slice(start, start + rows) for start in range(0, n_rows, rows)]


def _summed_nll(h, weight, bias, y) -> torch.Tensor:
    """Sum of -log softmax(logits)[y] over a chunk, exact (in-place log-softmax)."""
    log_probs = _logits(h, weight, bias)
    torch.ops.aten._log_softmax.out(log_probs, 1, False, out=log_probs)
    return -log_probs.gather(1, y.unsqueeze(1)).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        n = features.size(0)
        grad_features = torch.empty_like(features)
        grad_weight = torch.empty_like(weight, dtype=torch.float32)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=features.device)
        for i, rows in enumerate(_row_chunks(n, weight.size(0))):
            h, y = features[rows], targets[rows]
            probs = _logits(h, weight, bias)
            total += _softmax_and_summed_nll(probs, h, weight, bias, y, sync_free=probs.device.type != "cpu")
            # d(mean CE)/d(logits) = (softmax - onehot) / n: the softmax part through the GEMMs, the
            # one-hot part as row gathers/scatters of the small operands.
            grad_h = probs @ weight.to(probs.dtype)
            grad_features[rows] = ((grad_h - weight[y]) / n).to(features.dtype)
            h32 = h.float()
            grad_weight.addmm_(probs.t(), h32, beta=0 if i == 0 else 1, alpha=1 / n)
            grad_weight.index_add_(0, y, h32, alpha=-1 / n)
            if grad_bias is not None:
                grad_bias.add_(probs.sum(0), alpha=1 / n)
                grad_bias.index_add_(0, y, torch.full_like(y, -1 / n, dtype=grad_bias.dtype))
        # Kept on ctx, not save_for_backward (they are neither inputs nor outputs), so that backward can
        # hand over the only reference: autograd then adds a tied embedding's gradient into grad_weight
        # in place instead of allocating their sum (another V×D buffer).
        ctx.grads = grad_features, grad_weight, grad_bias
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_features, grad_weight, grad_bias = ctx.grads
        del ctx.grads
        # loss.backward() sends 1: then skip three passes over the gradients (reading it is free on CPU).
        if not (grad_output.device.type == "cpu" and grad_output.item() == 1.0):
            scale = grad_output.float()
            grad_features.mul_(scale.to(grad_features.dtype))
            grad_weight.mul_(scale)
            if grad_bias is not None:
                grad_bias.mul_(scale)
        grad_bias = None if grad_bias is None else grad_bias.to(ctx.weight_dtype)
        return grad_features, grad_weight.to(ctx.weight_dtype), grad_bias, None


def _softmax_and_summed_nll(logits, h, weight, bias, y, sync_free: bool) -> torch.Tensor:
    """Turn ``logits`` into probabilities in place; return the chunk's summed -log p(target), exact
    even where p(target) underflows to 0 in fp32 (a confidently wrong model)."""
    if not sync_free:
        # -log p is exact wherever p is a normal float; asking whether any row underflowed is free on
        # the CPU, and such rows are recomputed with an exact log-softmax.
        torch.ops.aten._softmax.out(logits, 1, False, out=logits)
        target_prob = logits.gather(1, y.unsqueeze(1)).squeeze(1)
        tiny = target_prob < TINY_PROBABILITY
        if not bool(tiny.any()):
            return -target_prob.log().sum()
        return -target_prob[~tiny].log().sum() + _summed_nll(h[tiny], weight, bias, y[tiny])
    # On a GPU that question would stall the queue. Instead, with j the most likely word,
    # p_j = 1 / sum(exp(logits - logit_j)) >= 1/vocab, so log-sum-exp = logit_j - log p_j (two row maxes).
    target_logit = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    top_logit = logits.amax(dim=1)
    torch.ops.aten._softmax.out(logits, 1, False, out=logits)
    return (top_logit - logits.amax(dim=1).log() - target_logit).sum()


def linear_cross_entropy(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(features, weight, bias), targets)`` (mean) in chunks; 2-D features."""
    if torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(features, weight, bias, targets)
    chunks = _row_chunks(features.size(0), weight.size(0))
    total = sum(_summed_nll(features[rows], weight, bias, targets[rows]) for rows in chunks)
    return total / features.size(0)
