"""Output layer + cross-entropy in row chunks, without ever holding the full (tokens × vocab) logits.

At vocabulary 33k a BPTT batch of 700 tokens has 23 M logits; the usual ``F.cross_entropy(linear(h))``
keeps the logits, their log-softmax and their gradient alive at once (~280 MB fp32). Here each chunk's
logits are made, turned into loss and gradients, and dropped: the gradients w.r.t. the features,
weight and bias are computed in the forward pass (the loss is the last op, so its upstream gradient is
a scalar that backward only multiplies in). Same three matrix products as the plain version, so no
extra FLOPs; peak memory is one chunk of logits.
"""

from __future__ import annotations

import torch

# Logits per chunk: 24 MiB in fp32 — big enough for efficient GEMMs, and under glibc's 32 MiB mmap
# ceiling, so the buffer is recycled from the heap instead of page-faulted in fresh at every chunk.
CHUNK_ELEMENTS = 6 << 20
VOCAB_BLOCK = 2048


def _logits_t(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits laid out (vocab, rows). On CPU in fp32 they are made in vocabulary blocks: with
    K = hidden size the single tall GEMM runs at ~100 GFLOP/s here, the blocked one at ~150."""
    blocked = h.device.type == "cpu" and h.dtype == weight.dtype == torch.float32
    if not blocked or torch.is_autocast_enabled("cpu"):
        logits = (weight @ h.t()).float()
    else:
        h_t = h.t().contiguous()
        logits = torch.empty(weight.size(0), h.size(0), device=h.device)
        for start in range(0, weight.size(0), VOCAB_BLOCK):
            torch.mm(weight[start : start + VOCAB_BLOCK], h_t, out=logits[start : start + VOCAB_BLOCK])
    if bias is not None:
        logits += bias.unsqueeze(1)
    return logits


def _chunks(features, weight, bias, targets):
    """Yield (row slice, features, targets, summed NLL, exp(logits - max), column sums of it) per chunk
    of rows; logits are (vocab, rows) and the exponentials are made in place, in one pass."""
    rows = max(1, CHUNK_ELEMENTS // weight.size(0))
    for start in range(0, features.size(0), rows):
        rows_slice = slice(start, start + rows)
        h, y = features[rows_slice], targets[rows_slice]
        logits = _logits_t(h, weight, bias)
        target_logit = logits.gather(0, y.unsqueeze(0)).squeeze(0)
        top = logits.amax(dim=0, keepdim=True)
        exp = logits.sub_(top).exp_()
        sum_exp = exp.sum(dim=0, keepdim=True)
        nll = (top + sum_exp.log()).squeeze(0) - target_logit
        yield rows_slice, h, y, nll.sum(), exp, sum_exp


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        n = features.size(0)
        grad_features = torch.empty_like(features)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=features.device)
        for rows, h, y, nll_sum, exp, sum_exp in _chunks(features, weight, bias, targets):
            total += nll_sum
            # d(mean CE)/d(logits) = (softmax - onehot) / n, in place and in one pass over the chunk.
            probs = exp.mul_(1.0 / (sum_exp * n))
            probs.scatter_add_(0, y.unsqueeze(0), probs.new_full((1, len(y)), -1.0 / n))
            grad_features[rows] = (probs.t().to(weight.dtype) @ weight).to(features.dtype)
            grad_weight.addmm_(probs, h.float())
            if grad_bias is not None:
                grad_bias += probs.sum(1)
        ctx.save_for_backward(grad_features, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_features, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output.float()
        return (
            grad_features * scale.to(grad_features.dtype),
            grad_weight.mul_(scale).to(ctx.weight_dtype),
            None if grad_bias is None else grad_bias.mul_(scale).to(ctx.weight_dtype),
            None,
        )


def linear_cross_entropy(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(features, weight, bias), targets)`` (mean) in chunks; 2-D features."""
    if torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(features, weight, bias, targets)
    total = sum(chunk[3] for chunk in _chunks(features, weight, bias, targets))
    return total / features.size(0)
