"""``method=cache``: a neural cache mixed in.

Grave et al. 2017, "Improving neural language models with a continuous cache": the last ``size`` (feature,
next word) pairs of each column form a cache; the cache distribution puts weight ``exp(theta · h_t · h_i)`` on
the word that followed ``h_i``, and is mixed with the model's: ``p = (1 - lambda) p_model + lambda p_cache``.
Positions before the first cached pair use the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from lmlab.config.schema import PositiveFloat, PositiveInt, UnitInterval
from lmlab.data.batching import TokenStream
from lmlab.evaluation.methods import EvaluationInputs, Scored, register_method
from lmlab.metrics import perplexity
from lmlab.models import LanguageModel
from lmlab.runtime.pass_progress import reported


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
    for window in reported(stream.windows(limit=limit), stream.num_windows(limit), "cache"):
        features, state = model(window.inputs, state)
        h = model.context_vectors(features).float()
        model_probs.append(model.target_log_probs(features, window.targets).exp())
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


@register_method("cache")
def cache(
    inputs: EvaluationInputs,
    size: PositiveInt = 2000,
    theta: PositiveFloat = 0.3,
    lambda_: UnitInterval = 0.1,
    search: bool = False,
) -> Scored:
    """A neural cache mixed in; ``search``: theta and lambda picked on the validation split first."""
    settings: dict[str, Any] = {"size": size, "theta": theta, "lambda": lambda_, "search": search}
    if search:
        started = time.perf_counter()
        scores = cache_scores(inputs.model, inputs.stream("valid"), size, CACHE_THETAS, inputs.limit)
        best, settings["theta"], settings["lambda"] = search_cache(scores)
        settings.update(valid_ppl=perplexity(best), search_seconds=time.perf_counter() - started)
    target = inputs.stream(inputs.split)
    scores = cache_scores(inputs.model, target, size, [settings["theta"]], inputs.limit)
    return Scored(scores.loss(settings["theta"], settings["lambda"]), target, settings)
