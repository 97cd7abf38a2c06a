"""``method=dynamic``: dynamic evaluation.

Krause et al. 2018, "Dynamic evaluation of neural sequence models": after scoring each window the model takes
a gradient step on it, RMS-normalised by gradient statistics of the training split, with a decay back towards
the trained weights. The weights are copied first; the caller's model and the checkpoint file are left as they
were.
"""

from __future__ import annotations

import copy

import torch

from lmlab.config.schema import NonNegativeFloat, PositiveInt, Probability
from lmlab.data.batching import TokenStream
from lmlab.errors import NonFiniteLoss
from lmlab.evaluation.methods import EvaluationInputs, Scored, register_method
from lmlab.models import LanguageModel, diverged
from lmlab.runtime.pass_progress import reported


def gradient_rms(model: LanguageModel, stream: TokenStream, batches: PositiveInt) -> list[torch.Tensor]:
    """sqrt(mean squared gradient) per parameter over ``batches`` windows of the training split."""
    model.eval()  # as in evaluation: no dropout
    squares = [torch.zeros_like(p) for p in model.parameters()]
    state, seen = model.init_state(stream.batch_size, stream.columns.device), 0
    for window in stream.windows(limit=batches):
        state = model.detach_state(state)
        model.zero_grad(set_to_none=True)
        features, state = model(window.inputs, state)
        model.loss(features, window.targets).backward()
        for square, p in zip(squares, model.parameters(), strict=True):
            if p.grad is not None:
                square += (p.grad.to_dense() if p.grad.is_sparse else p.grad) ** 2
        seen += 1
    model.zero_grad(set_to_none=True)
    return [(square / max(seen, 1)).sqrt() for square in squares]


def dynamic_loss(
    model: LanguageModel,
    stream: TokenStream,
    rms: list[torch.Tensor],
    lr: NonNegativeFloat,
    decay: Probability,
    limit: int | None = None,
    epsilon: float = 1e-5,
) -> float:
    """Score each window, then adapt to it: ``w -= lr * g / (rms + eps)``, then ``w += d * (w0 - w)``
    with ``d = min(decay * rms / mean(rms), 1)`` per weight (Krause et al.'s RMS-normalised rule and
    global prior). Works on a copy of ``model``."""
    adapted = copy.deepcopy(model).eval()
    params = list(adapted.parameters())
    originals = [p.detach().clone() for p in params]
    scale = [r + epsilon for r in rms]
    mean_rms = torch.cat([r.flatten() for r in rms]).mean().clamp_min(epsilon)
    decays = [(decay * r / mean_rms).clamp(max=1.0) for r in rms]
    state = adapted.init_state(stream.batch_size, stream.columns.device)
    total, count = 0.0, 0
    for window in reported(stream.windows(limit=limit), stream.num_windows(limit), "dynamic evaluation"):
        state = adapted.detach_state(state)
        adapted.zero_grad(set_to_none=True)
        features, state = adapted(window.inputs, state)
        loss = adapted.loss(features, window.targets)
        if diverged(loss.item(), adapted.vocab_size):
            raise NonFiniteLoss(
                f"dynamic evaluation diverged after {count:,} tokens (dynamic.lr={lr} is too large for this "
                "model); lower dynamic.lr or raise dynamic.decay"
            )
        total += loss.item() * window.targets.numel()  # scored before the model sees these targets
        count += window.targets.numel()
        if lr == 0:
            continue
        loss.backward()
        with torch.no_grad():
            for p, p0, s, d in zip(params, originals, scale, decays, strict=True):
                if p.grad is not None:
                    p -= lr * (p.grad.to_dense() if p.grad.is_sparse else p.grad) / s
                p += d * (p0 - p)
    return total / count


@register_method("dynamic")
def dynamic(
    inputs: EvaluationInputs,
    lr: NonNegativeFloat = 5e-4,
    decay: Probability = 0.02,
    bptt: PositiveInt = 20,
    stat_batches: PositiveInt = 200,
) -> Scored:
    """A copy of the model adapted to the text as it reads it, in windows of ``bptt``."""
    rms = gradient_rms(inputs.model, inputs.stream("train", bptt), stat_batches)
    target = inputs.stream(inputs.split, bptt)
    loss = dynamic_loss(inputs.model, target, rms, lr, decay, inputs.limit)
    return Scored(loss, target, {"lr": lr, "decay": decay, "bptt": bptt, "stat_batches": stat_batches})
