"""Evaluation-time methods on a trained model: static, neural cache, dynamic evaluation.

All read a :class:`~lmlab.data.batching.TokenStream` window by window through the model contract
(``forward``/``log_probs``/``loss``), so they work for every registered model; each returns the mean
loss in nats per token of the stream's targets.

- **static**: the model as trained (:meth:`lmlab.training.trainer.Trainer.evaluate`).
- **cache** (Grave et al. 2017, "Improving neural language models with a continuous cache"): the last
  ``size`` (feature, next word) pairs of each column form a cache; the cache distribution puts weight
  ``exp(theta · h_t · h_i)`` on the word that followed ``h_i``, and is mixed with the model's:
  ``p = (1 - lambda) p_model + lambda p_cache``. Positions before the first cached pair use the model.
- **dynamic** (Krause et al. 2018, "Dynamic evaluation of neural sequence models"): after scoring each
  window the model takes a gradient step on it, RMS-normalised by gradient statistics of the training
  split, with a decay back towards the trained weights. The weights are copied first; the caller's
  model and the checkpoint file are left as they were.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from lmlab.config.schema import NonNegativeFloat, PositiveInt, Probability
from lmlab.data.batching import TokenStream
from lmlab.errors import NonFiniteLoss
from lmlab.models import LanguageModel, diverged


# ------------------------------------------------------------------------------------------- cache
@dataclass
class CacheScores:
    """Per target token: the model's probability and, for each theta, the cache's (NaN: empty cache)."""

    model_prob: torch.Tensor  # (N,)
    cache_prob: dict[float, torch.Tensor]  # theta -> (N,)

    def loss(self, theta: float, interpolation: float) -> float:
        cache = self.cache_prob[theta]
        cache = torch.where(torch.isnan(cache), self.model_prob, cache)
        mixed = (1 - interpolation) * self.model_prob + interpolation * cache
        return -mixed.clamp_min(1e-45).log().mean().item()


@torch.inference_mode()
def cache_scores(
    model: LanguageModel, stream: TokenStream, size: PositiveInt, thetas: list[float], limit: int | None = None
) -> CacheScores:
    """One pass over ``stream`` giving what :meth:`CacheScores.loss` needs for any lambda and these thetas."""
    model.eval()
    device = stream.columns.device
    state = model.init_state(stream.batch_size, device)
    keys: torch.Tensor | None = None  # (cached positions, B, D): features whose next word is in `ids`
    ids = torch.zeros(0, stream.batch_size, dtype=torch.long, device=device)
    model_probs, cache_probs = [], {theta: [] for theta in thetas}
    for window in stream.windows(limit=limit):
        features, state = model(window.inputs, state)
        h = features.float()
        model_probs.append(model.log_probs(features).gather(-1, window.targets.unsqueeze(-1)).squeeze(-1).exp())
        keys = h[:0] if keys is None else keys
        all_keys, all_ids = torch.cat([keys, h]), torch.cat([ids, window.targets])
        steps, past = h.size(0), keys.size(0)
        # Step t may use the pairs at cached positions j with past + t - size <= j < past + t.
        position = torch.arange(past + steps, device=device)
        now = past + torch.arange(steps, device=device)[:, None]
        usable = (position < now) & (position >= now - size)  # (T, past + T)
        dots = torch.einsum("tbd,jbd->tbj", h, all_keys)  # (T, B, past + T)
        hits = all_ids.t()[None] == window.targets[:, :, None]  # (T, B, past + T): the cached word is the target
        for theta in thetas:
            logits = (theta * dots).masked_fill(~usable[:, None, :], float("-inf"))
            weights = torch.softmax(logits, -1).nan_to_num(nan=0.0)  # rows with nothing usable: all zero
            prob = (weights * hits).sum(-1)
            prob[~usable.any(-1)] = float("nan")
            cache_probs[theta].append(prob)
        keys, ids = all_keys[-size:], all_ids[-size:]
    flat = lambda parts: torch.cat([p.reshape(-1) for p in parts]).double()  # noqa: E731
    return CacheScores(flat(model_probs), {theta: flat(parts) for theta, parts in cache_probs.items()})


CACHE_THETAS = [0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0]
CACHE_LAMBDAS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def search_cache(scores: CacheScores) -> tuple[float, float, float]:
    """(loss, theta, lambda) of the grid point with the lowest loss on ``scores`` (the validation split)."""
    return min((scores.loss(t, lam), t, lam) for t in scores.cache_prob for lam in CACHE_LAMBDAS)


# ----------------------------------------------------------------------------------------- dynamic
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
    for window in stream.windows(limit=limit):
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
