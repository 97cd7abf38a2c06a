"""Output layer + cross-entropy fused, without holding logits, log-probabilities and their gradient at once.

At vocabulary 33k a BPTT batch of 700 tokens has 23 M logits; the usual ``F.cross_entropy(linear(h))``
keeps the logits, their log-softmax and their gradient alive at once (~280 MB fp32). Here the logits are
made, turned into loss and gradients, and dropped: the gradients w.r.t. the features, weight and bias
are computed in the forward pass (the loss is the last op, so its upstream gradient is a scalar that
backward only multiplies in). Same three matrix products as the plain version, so no extra FLOPs.

::

    features h (n, D) ──addmm──▶ logits (n, V) ──softmax, in place──▶ p (n, V)
                                                 │ gather p[y]: the loss, -sum log p[y] / n
                                                 ▼ p[y] -= 1  (softmax - onehot, a scatter of n values)
    grad h = p @ W / n      grad W = pᵀ @ h / n      grad b = sum(p) / n

A step dispatches a fixed, small number of operators (each one a kernel launch on a GPU): the logits
are one block when they fit :data:`LOGITS_BUDGET` (the default model's do), else equal row chunks. In
fp32 they are written into a buffer kept from one step to the next (``out=``), so a block larger than
glibc's mmap threshold (32 MiB) is not page-faulted in afresh at every step on a CPU.

:func:`linear_target_log_probs` is the same layer for a model that mixes the softmax's probability of each
target with something else (a pointer): log p(target) per token, whose gradient arrives per token in
backward (:class:`_LinearTargetLogProbs`).
"""

from __future__ import annotations

import weakref

import torch

from lmlab.runtime.dispatch import reads_are_free

# Logits in one block up to this many elements (256 MiB in fp32); larger batches are cut into equal chunks.
LOGITS_BUDGET = 64 << 20
# Below this a float32 probability has lost precision (subnormal from 1.2e-38): log p is not trusted.
TINY_PROBABILITY = 1e-30

_workspace: dict[torch.device, torch.Tensor] = {}  # device -> flat fp32 buffer for the logits
_views: dict[tuple[torch.device, int, int], torch.Tensor] = {}  # (device, rows, vocab) -> its (rows, vocab) view


def _row_chunks(n_rows: int, vocab_size: int) -> list[slice]:
    """Equal row chunks of at most LOGITS_BUDGET logits (700 rows → 350 + 350, not 457 + 243)."""
    n_chunks = -(-n_rows * vocab_size // LOGITS_BUDGET)
    rows = max(1, -(-n_rows // max(n_chunks, 1)))
    return [slice(start, start + rows) for start in range(0, n_rows, rows)]


def _logits(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 logits (rows, vocab), into ``out`` if given: else into the kept buffer where everything is fp32,
    or in the autocast dtype (the GEMM is the costly part) and then converted."""
    rows, vocab = h.size(0), weight.size(0)
    if h.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
        out = _views.get((h.device, rows, vocab)) if out is None else out
        if out is None:
            # Made as normal tensors even under inference mode (evaluation): an inference tensor, or a view
            # made there, could not be written by the training step that reuses it.
            with torch.inference_mode(False):
                buffer = _workspace.get(h.device)
                if buffer is None or buffer.numel() < rows * vocab:
                    buffer = _workspace[h.device] = torch.empty(rows * vocab, device=h.device)
                    _views.clear()  # views of the old buffer
                out = _views[(h.device, rows, vocab)] = buffer[: rows * vocab].view(rows, vocab)
        if bias is None:
            return torch.mm(h, weight.t(), out=out)
        return torch.addmm(bias, h, weight.t(), out=out)
    logits = (h @ weight.t()).float() if out is None else out.copy_(h @ weight.t())
    return logits if bias is None else logits.add_(bias)


def _summed_nll(h, weight, bias, y, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of -log softmax(logits)[y] over a chunk, exact (in-place log-softmax); the logits go into
    ``out`` if given, else into the kept buffer."""
    log_probs = _logits(h, weight, bias, out)
    torch.ops.aten._log_softmax.out(log_probs, 1, False, out=log_probs)
    return -log_probs.gather(1, y.unsqueeze(1)).sum()


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without dispatching an operator when ``t`` already is ``dtype``."""
    return t if t.dtype == dtype else t.to(dtype)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return as_dtype(t, torch.float32)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        n = features.size(0)
        sync_free = not reads_are_free(features.device)
        chunks = _row_chunks(n, weight.size(0))
        grads_h, grads_w, grads_b, total = [], None, None, None
        for rows in chunks:
            h, y = (features, targets) if len(chunks) == 1 else (features[rows], targets[rows])
            probs = _logits(h, weight, bias)
            column = y.unsqueeze(1)
            log_likelihood, target_prob = _softmax_and_log_likelihood(probs, h, weight, bias, column, sync_free)
            total = log_likelihood if total is None else total + log_likelihood
            # d(CE)/d(logits) = softmax - onehot: the one-hot part is a scatter of n values into p.
            probs.scatter_(1, column, target_prob.sub(1))
            with torch.autocast(features.device.type, enabled=False):  # gradients accumulate in fp32
                h32, w32 = _fp32(h), _fp32(weight)
                # The mean's 1/n rides on the GEMMs (alpha; beta=0 ignores the first argument's values).
                grads_h.append(torch.addmm(h32, probs, w32, beta=0, alpha=1 / n))
                grad_w = torch.addmm(w32, probs.t(), h32, beta=0, alpha=1 / n)
                grads_w = grad_w if grads_w is None else grads_w.add_(grad_w)
                if bias is not None:
                    grad_b = probs.sum(0).div_(n)
                    grads_b = grad_b if grads_b is None else grads_b.add_(grad_b)
        grad_features = grads_h[0] if len(grads_h) == 1 else torch.cat(grads_h)
        # Kept on ctx, not save_for_backward (they are neither inputs nor outputs), so that backward can
        # hand over the only reference: autograd then adds a tied embedding's gradient into grad_weight
        # in place instead of allocating their sum (another V×D buffer).
        ctx.grads = grad_features, grads_w, grads_b
        ctx.dtypes = features.dtype, weight.dtype
        return total.div(-n)  # the mean negative log-likelihood

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_features, grad_weight, grad_bias = ctx.grads
        del ctx.grads
        # loss.backward() sends 1: then skip three passes over the gradients (reading it is free on CPU).
        if not (reads_are_free(grad_output.device) and grad_output.item() == 1.0):
            scale = _fp32(grad_output)
            grad_features, grad_weight = grad_features.mul_(scale), grad_weight.mul_(scale)
            grad_bias = None if grad_bias is None else grad_bias.mul_(scale)
        features_dtype, weight_dtype = ctx.dtypes
        grad_bias = None if grad_bias is None else as_dtype(grad_bias, weight_dtype)
        return as_dtype(grad_features, features_dtype), as_dtype(grad_weight, weight_dtype), grad_bias, None


def _softmax_and_log_likelihood(
    logits: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    column: torch.Tensor,
    sync_free: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn ``logits`` into probabilities in place; return the chunk's summed log p(target), exact even
    where p(target) underflows to 0 in fp32 (a confidently wrong model), and p(target) (rows, 1).
    ``column``: the targets as a (rows, 1) column."""
    if not sync_free:
        # log p is exact wherever p(target) is a normal float; whether the smallest is, reading it is free
        # on the CPU. Rows below (a confidently wrong model) are recomputed with an exact log-softmax.
        torch.ops.aten._softmax.out(logits, 1, False, out=logits)
        target_prob = logits.gather(1, column)
        if target_prob.min().item() >= TINY_PROBABILITY:
            return target_prob.log().sum(), target_prob
        tiny = target_prob < TINY_PROBABILITY
        rows = h[tiny.squeeze(1)]
        # Into a block of their own: the kept buffer holds ``logits``, the probabilities the gradient is
        # made of (writing these rows' log-softmax over them wrecked every gradient of the chunk).
        scratch = torch.empty(rows.size(0), weight.size(0), device=h.device)
        exact = _summed_nll(rows, weight, bias, column[tiny], out=scratch)
        return target_prob[~tiny].log().sum() - exact, target_prob
    # On a GPU that question would stall the queue. Instead, with j the most likely word,
    # p_j = 1 / sum(exp(logits - logit_j)) >= 1/vocab, so log-sum-exp = logit_j - log p_j (two row maxes).
    target_logit = logits.gather(1, column)
    top_logit = logits.amax(dim=1, keepdim=True)
    torch.ops.aten._softmax.out(logits, 1, False, out=logits)
    log_likelihood = (target_logit - top_logit).add_(logits.amax(dim=1, keepdim=True).log_()).sum()
    return log_likelihood, logits.gather(1, column)


class _LinearTargetLogProbs(torch.autograd.Function):
    """Per row log p(target): the upstream gradient differs per row (a pointer weighs each position's
    softmax by its own gate), so the gradients cannot be made in the forward pass as above. The
    probabilities are kept (one (n, V) block) and turned into the logits' gradient in place in backward::

        forward:  logits ──softmax, in place──▶ p        log p[y] = logit[y] - max + log max(p)
        backward: G = u * (onehot - p) in place; grad h = G @ W, grad W = Gᵀ @ h, grad b = sum(G)

    which spares ``log_softmax`` + ``gather``'s backward their extra passes over (n, V): a zero-filled
    gradient, a scatter into it and a second (n, V) block for the log-softmax's backward."""

    @staticmethod
    def forward(
        ctx, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        column = targets.unsqueeze(1)
        probs, ctx.lease = _leased_block(features.device, features.size(0), weight.size(0))
        _logits(features, weight, bias, out=probs)
        picked = _softmax_and_target_log_probs(probs, column)
        ctx.save_for_backward(features, weight, column)
        ctx.probs, ctx.has_bias = probs, bias is not None
        ctx.dtypes = features.dtype, weight.dtype
        return picked.squeeze(1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        features, weight, column = ctx.saved_tensors
        grads = ctx.probs  # becomes d(sum u * log p[y]) / d(logits) = u * (onehot - p), in place
        del ctx.probs
        upstream = _fp32(grad_output).unsqueeze(1)
        grads.mul_(upstream.neg()).scatter_add_(1, column, upstream)
        with torch.autocast(features.device.type, enabled=False):  # gradients in fp32
            h32, w32 = _fp32(features), _fp32(weight)
            grad_features = grads @ w32 if ctx.needs_input_grad[0] else None
            grad_weight = grads.t() @ h32 if ctx.needs_input_grad[1] else None
            grad_bias = grads.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        features_dtype, weight_dtype = ctx.dtypes
        del ctx.lease  # the kept block is free for the next forward pass
        return (
            None if grad_features is None else as_dtype(grad_features, features_dtype),
            None if grad_weight is None else as_dtype(grad_weight, weight_dtype),
            None if grad_bias is None else as_dtype(grad_bias, weight_dtype),
            None,
        )


class _Lease:
    """Held by a forward pass's autograd context while its probabilities live in the kept block."""


_kept_block: dict[torch.device, tuple[torch.Tensor, weakref.ref]] = {}  # device -> (flat buffer, its lease)


def _leased_block(device: torch.device, rows: int, vocab: int) -> tuple[torch.Tensor, _Lease]:
    """A (rows, vocab) fp32 block valid while the returned lease lives. On a CPU, the kept one unless an
    earlier forward pass still holds it (its backward not run yet, its graph not freed): a block of tens of
    MB is above glibc's mmap threshold, so a new one would be page-faulted in at every step (measured in
    experiments/bench.md); a GPU's caching allocator reuses blocks by itself."""
    lease = _Lease()
    buffer, holder = _kept_block.get(device, (None, None))
    if device.type != "cpu" or (holder is not None and holder() is not None):
        return torch.empty(rows, vocab, device=device), lease
    if buffer is None or buffer.numel() < rows * vocab:
        with torch.inference_mode(False):  # writable by the training steps that reuse it
            buffer = torch.empty(rows * vocab, device=device)
    _kept_block[device] = buffer, weakref.ref(lease)
    return buffer[: rows * vocab].view(rows, vocab), lease


def _softmax_and_target_log_probs(logits: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """Turn ``logits`` (rows, V) into probabilities in place; return log p(target) per row (rows, 1), exact
    where p(target) underflows in fp32: with j the most likely word, p_j >= 1/V is never tiny, and
    log p(y) = logit_y - logit_j + log p_j."""
    target_logit = logits.gather(1, column)
    top_logit = logits.amax(dim=1, keepdim=True)
    torch.ops.aten._softmax.out(logits, 1, False, out=logits)
    return (target_logit - top_logit).add_(logits.amax(dim=1, keepdim=True).log_())


def linear_target_log_probs(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """``F.log_softmax(F.linear(features, weight, bias), -1).gather(-1, targets)`` per row, fp32 (n,),
    fused; 2-D features, 1-D targets. Without gradients the logits are made in chunks in a kept buffer."""
    if torch.is_grad_enabled() and (
        features.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _LinearTargetLogProbs.apply(features, weight, bias, targets)
    picked = [
        _softmax_and_target_log_probs(_logits(features[rows], weight, bias), targets[rows].unsqueeze(1))
        for rows in _row_chunks(features.size(0), weight.size(0))
    ]
    return torch.cat(picked).squeeze(1)


def linear_cross_entropy(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(features, weight, bias), targets)`` (mean), fused; 2-D features."""
    if torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(features, weight, bias, targets)
    chunks = _row_chunks(features.size(0), weight.size(0))
    total = sum(_summed_nll(features[rows], weight, bias, targets[rows]) for rows in chunks)
    return total / features.size(0)
