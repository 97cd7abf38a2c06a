"""An ensemble: several trained models scored as one, ``p = sum_k w_k p_k`` per word.

Models trained apart make different mistakes, and the mean of their distributions is better than the best
of them — most of all when they are different kinds of model (a Transformer and an LSTM), and in the
regime of a small corpus, where each over-fits in its own way. The weights are equal unless ``search``
picks them on the validation split: the maximum-likelihood mixture weights of fixed distributions, by
expectation-maximisation (each step can only lower the validation loss; it converges in tens of steps).
Static like ``method=ngram``: the members are trained models, nothing is learnt from the scored text.

Two ways in:

- ``python -m lmlab.evaluate checkpoint=A method=ensemble ensemble.members=[B,C] ensemble.search=true``
  (or ``test_with=[ensemble]`` in a run): the checkpoint being evaluated plus ``members``.
- a multirun whose jobs are the members (``+sweep=cpu_ensemble``: a Transformer and an LSTM trained
  side by side, one thread each): :class:`lmlab.evaluation.sweep_ensemble.EnsembleOfSweep` scores the
  finished jobs' best checkpoints together when the sweep is over.

Every member must use the same vocabulary, word for word (the same corpus, ``dataset.max_vocab`` and
``dataset.min_freq``): the distributions are added id by id.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmlab.data.batching import TokenStream
from lmlab.data.corpus import Vocabulary
from lmlab.errors import ConfigError
from lmlab.evaluation.methods import EvaluationInputs, Scored, register_method, register_preflight, target_probs
from lmlab.metrics import perplexity
from lmlab.models import LanguageModel
from lmlab.runtime.devices import recorded_precision
from lmlab.training.checkpoint_format import load_checkpoint, model_from_checkpoint

EM_STEPS = 100  # far more than the mixture weights of a few members need to settle (to ~1e-6)


def mixture_loss(probs: torch.Tensor, weights: torch.Tensor) -> float:
    """Mean ``-log sum_k w_k p_k`` in nats; ``probs`` (K, N): each member's probability of each target."""
    return -(weights.to(probs) @ probs).clamp_min(1e-300).log().mean().item()


def mixture_weights(probs: torch.Tensor, steps: int = EM_STEPS) -> torch.Tensor:
    """The weights (K,) that maximise the mean log-likelihood of ``sum_k w_k p_k`` over the N targets of
    ``probs`` (K, N), by expectation-maximisation from equal weights: each member's new weight is its mean
    share of the mixture's probability, ``w_k <- mean_n w_k p_kn / sum_j w_j p_jn``."""
    weights = torch.full((probs.shape[0],), 1.0 / probs.shape[0], dtype=probs.dtype)
    for _ in range(steps):
        shares = weights[:, None] * probs / (weights @ probs).clamp_min(1e-300)
        weights = shares.mean(dim=1)
    return weights


def load_members(
    paths: list[str], vocab: Vocabulary, device: torch.device
) -> tuple[list[LanguageModel], list[torch.dtype | None]]:
    """The models saved at ``paths`` (safely: :func:`model_from_checkpoint`), each refused in one line unless its
    vocabulary is ``vocab``'s, word for word; and the precision each one's run tested in (scored the same way,
    a member's figure here is its own run's test figure)."""
    members, dtypes = [], []
    for path in paths:
        model, member_vocab, state = model_from_checkpoint(path, device)
        _require_vocabulary(path, member_vocab.words, vocab)
        members.append(model)
        dtypes.append(recorded_precision(state.get("config"), device))
    return members, dtypes


def score_members(
    models: list[LanguageModel], stream: TokenStream, limit: int | None = None, dtypes: list | None = None
) -> torch.Tensor:
    """Each model's probability of each target of ``stream``, (K, N) float64, aligned token by token, each
    under autocast to its ``dtypes`` entry (None: fp32)."""
    dtypes = dtypes or [None] * len(models)
    labels = [f"ensemble member {i}/{len(models)}" for i in range(1, len(models) + 1)]
    scored = zip(models, dtypes, labels, strict=True)
    return torch.stack([target_probs(m, stream, limit, dtype, label) for m, dtype, label in scored])


def score_ensemble(
    models: list[LanguageModel],
    stream: Callable[..., TokenStream],
    split: str,
    search: bool,
    limit: int | None = None,
    names: list[str] | None = None,
    dtypes: list[torch.dtype | None] | None = None,
) -> tuple[float, TokenStream, dict[str, Any]]:
    """The mean loss of ``models``' mixture on ``split`` (``stream(split)``: its evaluation windows), with
    equal weights or, with ``search``, those that fit the validation split best; and the settings: the
    weights, each member's own perplexity on ``split``, and the validation figure a search reached."""
    settings: dict[str, Any] = {"members": names or [f"model {k}" for k in range(len(models))], "search": search}
    weights = torch.full((len(models),), 1.0 / len(models), dtype=torch.float64)
    if search:
        started = time.perf_counter()
        valid = score_members(models, stream("valid"), limit, dtypes)
        weights = mixture_weights(valid)
        settings["valid_ppl"] = perplexity(mixture_loss(valid, weights))
        settings["search_seconds"] = time.perf_counter() - started
    target = stream(split)
    probs = score_members(models, target, limit, dtypes)
    settings["weights"] = [round(w, 4) for w in weights.tolist()]
    settings["member_ppl"] = [perplexity(-row.log().mean().item()) for row in probs]  # each alone, for reference
    return mixture_loss(probs, weights), target, settings


@register_preflight("ensemble")
def check_members(vocab: Vocabulary, members: list[str], **_: Any) -> None:
    """Before any work: there are members, each a checkpoint file lmlab reads (safely) with ``vocab``'s words."""
    _check_member_list(members)
    for path in members:  # a file that is no checkpoint: the same line as checkpoint=
        _require_vocabulary(path, load_checkpoint(path)["vocab"], vocab)


def _check_member_list(members: list[str]) -> None:
    """There are members, each named once (files that exist; :func:`load_members` refuses the others)."""
    if not members:
        raise ConfigError("method=ensemble needs other models: ensemble.members=[PATH,...] (their best.pt files)")
    existing = [path for path in members if Path(path).exists()]
    for k, path in enumerate(existing):
        if any(os.path.samefile(path, earlier) for earlier in existing[:k]):
            raise ConfigError(f"ensemble.members names {path} twice; name each member once")


def _require_vocabulary(path: str, words: list[str], vocab: Vocabulary) -> None:
    if words != vocab.words:
        raise ConfigError(
            f"ensemble member {path} has another vocabulary ({len(words)} words, the model being evaluated "
            f"{len(vocab)}): train every member on the same corpus with the same dataset.max_vocab and "
            "dataset.min_freq"
        )


@register_method("ensemble")
def ensemble(inputs: EvaluationInputs, members: list[str] = [], search: bool = False) -> Scored:  # noqa: B006
    """The model mixed with the models saved at ``members`` (checkpoint paths); ``search``: the weights
    fitted on the validation split (else equal)."""
    if inputs.vocab is None:
        raise ConfigError("method=ensemble needs the evaluated model's vocabulary, which this caller did not pass")
    _check_member_list(members)  # their files and words: load_members (a preflight checked them before any work)
    if search and inputs.split == "valid":
        raise ConfigError(
            "ensemble.search=true fits the weights on the validation split, so it cannot also score it; "
            "score split=test, or set ensemble.search=false"
        )
    device = next(inputs.model.parameters()).device
    others, dtypes = load_members(members, inputs.vocab, device)
    names = ["the evaluated checkpoint", *members]
    loss, target, settings = score_ensemble(
        [inputs.model, *others], inputs.stream, inputs.split, search, inputs.limit, names, [inputs.dtype, *dtypes]
    )
    return Scored(loss, target, settings)
