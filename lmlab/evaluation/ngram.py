"""``method=ngram``: a Kneser-Ney n-gram of the training split mixed in.

An interpolated Kneser-Ney n-gram of the training split (:mod:`lmlab.data.kneser_ney`) is mixed in, ``p =
(1 - lambda) p_model + lambda p_ngram``. Static: its counts come from the training split only and it
conditions on the last ``order - 1`` words, so nothing is learnt from the scored text (unlike cache and
dynamic). Small corpora gain most, where exact phrases are what a regularised model blurs.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from lmlab.config.schema import PositiveInt, UnitInterval
from lmlab.data.batching import TokenStream
from lmlab.data.corpus import Vocabulary
from lmlab.data.kneser_ney import KneserNey, check_history, check_order
from lmlab.evaluation.methods import EvaluationInputs, Scored, register_method, register_preflight, target_probs
from lmlab.metrics import perplexity

NGRAM_LAMBDAS = [i / 20 for i in range(20)]  # the n-gram's weight; 0: the model alone


def mixed_loss(model_prob: torch.Tensor, ngram_prob: torch.Tensor, weight: float) -> float:
    """Mean -log((1 - weight) p_model + weight p_ngram) in nats."""
    return -((1 - weight) * model_prob + weight * ngram_prob).clamp_min(1e-300).log().mean().item()


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

    def scores(stream: TokenStream, label: str) -> tuple[torch.Tensor, torch.Tensor]:
        model_prob = target_probs(inputs.model, stream, inputs.limit, inputs.dtype, label)
        return model_prob, counts.column_probs(stream.columns, model_prob.numel() // stream.batch_size)

    if search:
        started = time.perf_counter()
        valid = scores(inputs.stream("valid"), "ngram weight search (valid)")
        best, settings["lambda"] = min((mixed_loss(*valid, weight), weight) for weight in NGRAM_LAMBDAS)
        settings.update(valid_ppl=perplexity(best), search_seconds=time.perf_counter() - started)
    target = inputs.stream(inputs.split)
    model_prob, ngram_prob = scores(target, f"ngram ({inputs.split})")
    settings["ngram_ppl"] = perplexity(-ngram_prob.log().mean().item())  # the n-gram alone, for reference
    return Scored(mixed_loss(model_prob, ngram_prob, settings["lambda"]), target, settings)


@register_preflight("ngram")
def _check_ngram(vocab: Vocabulary, order: int, **_: Any) -> None:
    check_history(order, "ngram.order")
    check_order(order, len(vocab), "ngram.order")
