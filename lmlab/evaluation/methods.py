"""Evaluation-time methods on a trained model: static, neural cache, dynamic evaluation.

All read a :class:`~lmlab.data.batching.TokenStream` window by window through the model contract
(``forward``/``log_probs``/``loss``), so they work for every registered model; each returns the mean
loss in nats per token of the stream's targets.

Methods are a registry (:data:`METHODS`): ``python -m lmlab.evaluate method=<name>`` runs the function
registered under that name with ``@register_method``. Its first argument is an :class:`EvaluationInputs`;
the others are its settings, and their annotations are their schema: ``<name>.<setting>=value`` on the
command line (a setting named like a Python keyword takes a trailing ``_``: ``cache.lambda`` →
``lambda_``). It returns a :class:`Scored`.

- **static**: the model as trained (:meth:`lmlab.training.trainer.Trainer.evaluate`).
- **cache** (Grave et al. 2017, "Improving neural language models with a continuous cache"): the last
  ``size`` (feature, next word) pairs of each column form a cache; the cache distribution puts weight
  ``exp(theta · h_t · h_i)`` on the word that followed ``h_i``, and is mixed with the model's:
  ``p = (1 - lambda) p_model + lambda p_cache``. Positions before the first cached pair use the model.
- **ngram**: an interpolated Kneser-Ney n-gram of the training split (:mod:`lmlab.models.kneser_ney`) is
  mixed in, ``p = (1 - lambda) p_model + lambda p_ngram``. Static: its counts come from the training split
  only and it conditions on the last ``order - 1`` words, so nothing is learnt from the scored text (unlike
  cache and dynamic). Small corpora gain most, where exact phrases are what a regularised model blurs.
- **dynamic** (Krause et al. 2018, "Dynamic evaluation of neural sequence models"): after scoring each
  window the model takes a gradient step on it, RMS-normalised by gradient statistics of the training
  split, with a decay back towards the trained weights. The weights are copied first; the caller's
  model and the checkpoint file are left as they were.
- **ensemble** (:mod:`lmlab.evaluation.ensemble`): the model mixed with other trained models of the same
  vocabulary, ``p = sum_k w_k p_k``, equal weights or fitted on the validation split.
"""

from __future__ import annotations

import copy
import inspect
import keyword
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lmlab.config.schema import (
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    Probability,
    UnitInterval,
    argument_hints,
    check_value,
)
from lmlab.data.batching import TokenStream
from lmlab.data.corpus import Vocabulary
from lmlab.errors import ConfigError, NonFiniteLoss
from lmlab.metrics import perplexity
from lmlab.models import LanguageModel, diverged
from lmlab.models.kneser_ney import KneserNey, check_history, check_order
from lmlab.registry import Registry


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


# ------------------------------------------------------------------------------------------- ngram
NGRAM_LAMBDAS = [i / 20 for i in range(20)]  # the n-gram's weight; 0: the model alone


@torch.inference_mode()
def target_probs(
    model: LanguageModel, stream: TokenStream, limit: int | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The model's probability of each target (float64), flattened row by row as the windows hand them out;
    computed under autocast to ``dtype`` if given (the precision the model's own run tested it in)."""
    model.eval()
    device = stream.columns.device
    state, probs = model.init_state(stream.batch_size, device), []
    for window in stream.windows(limit=limit):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            features, state = model(window.inputs, state)
            probs.append(model.target_log_probs(features, window.targets).double().exp().flatten().cpu())
    return torch.cat(probs)


def mixed_loss(model_prob: torch.Tensor, ngram_prob: torch.Tensor, weight: float) -> float:
    """Mean -log((1 - weight) p_model + weight p_ngram) in nats."""
    return -((1 - weight) * model_prob + weight * ngram_prob).clamp_min(1e-300).log().mean().item()


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


# ---------------------------------------------------------------------------------------- registry
@dataclass
class EvaluationInputs:
    """What every method is handed: the model, the split to score, and the data's other splits."""

    model: LanguageModel
    split: str  # the split to score
    stream: Callable[..., TokenStream]  # stream(split, bptt=None): a split as evaluation windows on the device
    static_loss: Callable[[TokenStream], float]  # the plain evaluation (lmlab.training.Trainer.evaluate)
    limit: int | None = None  # at most this many windows of the scored split
    vocab: Vocabulary | None = None  # the model's words, for methods that combine it with other models
    dtype: torch.dtype | None = None  # the autocast dtype its plain figure is made in (None: fp32)


@dataclass
class Scored:
    """A method's result: the loss in nats per token of ``stream``'s targets, and the settings it used
    (with anything it chose or measured, e.g. a searched theta)."""

    loss: float
    stream: TokenStream  # what was scored (its windows count the tokens)
    settings: dict[str, Any] = field(default_factory=dict)


METHODS = Registry("evaluation method", "method")
register_method = METHODS.register  # function decorator: make a method selectable as method=<name>

# name -> check(vocab, **settings): what a method can refuse before any work (a training run's first step,
# an evaluation's first window), given the vocabulary the scored model has. Optional for a method.
PREFLIGHT: dict[str, Callable[..., None]] = {}


def register_preflight(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorator: ``check(vocab, **settings)`` runs before any work for method ``name``; it raises
    :class:`~lmlab.errors.ConfigError` (or CheckpointError) for what the method would refuse later."""

    def add(check: Callable[..., None]) -> Callable[..., None]:
        PREFLIGHT[name] = check
        return check

    return add


def check_before_work(name: str, settings: dict[str, Any], vocab: Vocabulary) -> None:
    """Run method ``name``'s preflight check (if it has one) with its settings, defaults filled in."""
    check = PREFLIGHT.get(name)
    if check is None:
        return
    bound = inspect.signature(METHODS.lookup(name)).bind_partial(None, **settings)
    bound.apply_defaults()
    check(vocab, **{key: value for key, value in list(bound.arguments.items())[1:]})


def method_settings(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """Check ``<name>.<key>`` values against the method's annotated signature (one line per bad value);
    returns its keyword arguments."""
    method = METHODS.lookup(name)
    hints = argument_hints(method)
    accepted = [p for p in hints if p != "inputs"]
    arguments = {}
    for key, value in values.items():
        param = f"{key}_" if keyword.iskeyword(key) else key
        if param not in accepted:
            valid = ", ".join(p.rstrip("_") for p in accepted) or "none"
            raise ConfigError(f"{name}.{key} is not a setting of method {name}; valid keys: {valid}")
        check_value(f"{name}.{key}", value, hints[param])
        arguments[param] = value
    return arguments


@register_method("static")
def static(inputs: EvaluationInputs) -> Scored:
    """The model as trained."""
    target = inputs.stream(inputs.split)
    return Scored(inputs.static_loss(target), target)


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


@register_method("ngram")
def ngram(
    inputs: EvaluationInputs, order: PositiveInt = 4, lambda_: UnitInterval = 0.2, search: bool = False
) -> Scored:
    """A Kneser-Ney n-gram of the training split mixed in; ``search``: lambda picked on the validation split."""
    check_history(order, "ngram.order")
    check_order(order, inputs.model.vocab_size, "ngram.order")
    started = time.perf_counter()
    counts = KneserNey(inputs.stream("train").columns.t().reshape(-1), inputs.model.vocab_size, order)
    settings: dict[str, Any] = {"order": order, "lambda": lambda_, "search": search}
    settings["build_seconds"] = time.perf_counter() - started

    def scores(stream: TokenStream) -> tuple[torch.Tensor, torch.Tensor]:
        model_prob = target_probs(inputs.model, stream, inputs.limit, inputs.dtype)
        return model_prob, counts.column_probs(stream.columns, model_prob.numel() // stream.batch_size)

    if search:
        started = time.perf_counter()
        valid = scores(inputs.stream("valid"))
        best, settings["lambda"] = min((mixed_loss(*valid, weight), weight) for weight in NGRAM_LAMBDAS)
        settings.update(valid_ppl=perplexity(best), search_seconds=time.perf_counter() - started)
    target = inputs.stream(inputs.split)
    model_prob, ngram_prob = scores(target)
    settings["ngram_ppl"] = perplexity(-ngram_prob.log().mean().item())  # the n-gram alone, for reference
    return Scored(mixed_loss(model_prob, ngram_prob, settings["lambda"]), target, settings)


@register_preflight("ngram")
def _check_ngram(vocab: Vocabulary, order: int, **_: Any) -> None:
    check_history(order, "ngram.order")
    check_order(order, len(vocab), "ngram.order")


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
