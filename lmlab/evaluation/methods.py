"""Evaluation-time methods on a trained model: the contract every method keeps, and their registry.

A method is a function registered under a name with ``@register_method``: ``python -m lmlab.evaluate
method=<name>`` runs it (and ``test_with=[<name>]`` after a training run). Its first argument is an
:class:`EvaluationInputs`; the others are its settings, and their annotations are their schema:
``<name>.<setting>=value`` on the command line (a setting named like a Python keyword takes a trailing ``_``:
``cache.lambda`` -> ``lambda_``). It returns a :class:`Scored`. What a method can refuse before any work (a
file it will read, a value that depends on the vocabulary) it says in a check registered with
``@register_preflight``, run before a training run's first step.

Every method reads a :class:`~lmlab.data.batching.TokenStream` window by window through the model contract
(``forward``/``log_probs``/``loss``), so it works for every registered model. The built-in ones, one module
each (importing :mod:`lmlab.evaluation` registers them):

- **static** (:mod:`~lmlab.evaluation.static`): the model as trained.
- **cache** (:mod:`~lmlab.evaluation.cache`): a neural cache of recent (feature, next word) pairs mixed in.
- **ngram** (:mod:`~lmlab.evaluation.ngram`): a Kneser-Ney n-gram of the training split mixed in.
- **dynamic** (:mod:`~lmlab.evaluation.dynamic`): a copy of the model adapted to the text as it reads it.
- **ensemble** (:mod:`~lmlab.evaluation.ensemble`): the model mixed with other trained models.
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lmlab.config.schema import argument_hints, check_value
from lmlab.data.batching import TokenStream
from lmlab.data.corpus import Vocabulary
from lmlab.errors import ConfigError
from lmlab.models import LanguageModel
from lmlab.registry import Registry
from lmlab.runtime.pass_progress import reported


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


@torch.inference_mode()
def target_probs(
    model: LanguageModel,
    stream: TokenStream,
    limit: int | None = None,
    dtype: torch.dtype | None = None,
    label: str = "scoring",
) -> torch.Tensor:
    """The model's probability of each target (float64), flattened row by row as the windows hand them out;
    computed under autocast to ``dtype`` if given (the precision the model's own run tested it in). A long pass
    reports its progress as ``label``."""
    model.eval()
    device = stream.columns.device
    state, probs = model.init_state(stream.batch_size, device), []
    for window in reported(stream.windows(limit=limit), stream.num_windows(limit), label):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            features, state = model(window.inputs, state)
            probs.append(model.target_log_probs(features, window.targets).double().exp().flatten().cpu())
    return torch.cat(probs)
