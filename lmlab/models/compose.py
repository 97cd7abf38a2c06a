"""Building a model from its name and arguments: a registered *body* plus the *heads* it asks for.

A body (``model.name``: ``rnn``, ``transformer``, one of your own) reads the words and gives context
vectors and a softmax; a head (``model.heads``: ``pointer``, ``ngram``) wraps any body and changes how its
output is scored. Heads compose, so ``model.name=transformer model.heads=[pointer,ngram]`` is one class
built here, not one written per pair::

    model.name ─▶ MODELS ─▶ body class ──┐
                                          ├─▶ class NgramPointerTransformerLanguageModel(Ngram, Pointer, Body)
    model.heads ─▶ HEADS ─▶ head mixins ─┘        (innermost head first: by each head's ``rank``)

A head is a :class:`~lmlab.models.base.LanguageModel` mixin registered with :func:`register_head`: its
constructor takes its own settings (plain, annotated keyword arguments, flat in ``model.*``) and hands
``**body_arguments`` on; its methods call ``super()`` for the model beneath it (the body, or a lower head).

The names of the classes written per pair before heads composed (``pointer_rnn``, ``pointer_transformer``,
``ngram_pointer_rnn``, ``ngram_pointer_transformer``) still name those models, in a config and in the
checkpoints that stored them: :data:`COMBINED_NAMES`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from lmlab.config.schema import check_arguments
from lmlab.errors import ConfigError
from lmlab.models.base import MODELS, LanguageModel
from lmlab.registry import Registry

HEADS = Registry("model head", "model.heads", LanguageModel)
register_head = HEADS.register  # class decorator: make a head mixin selectable as model.heads=[<name>]

# A name that stood for a body and its heads (checkpoints written before heads composed store them).
COMBINED_NAMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pointer_rnn": ("rnn", ("pointer",)),
    "pointer_transformer": ("transformer", ("pointer",)),
    "ngram_pointer_rnn": ("rnn", ("pointer", "ngram")),
    "ngram_pointer_transformer": ("transformer", ("pointer", "ngram")),
}


def context_dim_for(head: str, model: LanguageModel) -> int:
    """The body's :attr:`~lmlab.models.base.LanguageModel.context_dim`, which every head reads, or one line
    saying the body does not give it."""
    try:
        return model.context_dim
    except NotImplementedError:
        body = type(model).__bases__[-1]  # a composed class's bases: (*heads, body)
        raise ConfigError(
            f"the {head} head reads the body's context vectors, and {body.__name__} does not say how wide they are "
            "(its context_dim); give it one, or drop the head from model.heads"
        ) from None


def head_names(heads: Any) -> tuple[str, ...]:
    """``model.heads`` checked and put in the order they wrap the body (each head's ``rank``, lowest
    innermost): ``[ngram, pointer]`` and ``[pointer, ngram]`` are one model."""
    if heads is None:
        return ()
    if isinstance(heads, str) or not isinstance(heads, (list, tuple)):
        raise ConfigError(f"model.heads={heads!r} is not a list of head names; e.g. model.heads=[pointer]")
    for name in heads:
        HEADS.lookup(name)
    if len(set(heads)) != len(heads):
        raise ConfigError(f"model.heads={list(heads)} names a head twice; name each once")
    return tuple(sorted(heads, key=lambda name: HEADS[name].rank))


@functools.cache
def _composed(body: type[LanguageModel], heads: tuple[str, ...]) -> type[LanguageModel]:
    mixins = [HEADS[name] for name in reversed(heads)]  # outermost first, as Python reads bases
    name = "".join(mixin.prefix for mixin in mixins) + body.__name__
    return type(name, (*mixins, body), {"__module__": __name__, "__doc__": f"{body.__name__} + heads {list(heads)}"})


def resolve(name: Any, arguments: dict[str, Any]) -> tuple[type[LanguageModel], dict[str, Any]]:
    """(the class ``model.name`` + ``model.heads`` stand for, the constructor's arguments: ``arguments``
    without ``heads``). Raises :class:`~lmlab.errors.ConfigError` naming an unknown body or head."""
    arguments = dict(arguments)
    heads = list(head_names(arguments.pop("heads", None)))
    if isinstance(name, str) and name in COMBINED_NAMES:
        name, implied = COMBINED_NAMES[name]
        heads = [*implied, *(head for head in heads if head not in implied)]
    body = MODELS.lookup(name)
    return (_composed(body, head_names(heads)) if heads else body), arguments


def model_class(name: Any, heads: Any = ()) -> type[LanguageModel]:
    """The class ``model.name`` (a body, or one of :data:`COMBINED_NAMES`) and ``model.heads`` stand for."""
    return resolve(name, {"heads": list(heads)})[0]


def _constructor_chain(cls: type) -> list[tuple[type, dict[str, inspect.Parameter]]]:
    """(class, its constructor's parameters) down the bases for as long as a constructor hands ``**kwargs``
    on to the next (a head to its body)."""
    chain = []
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            params = dict(inspect.signature(klass.__init__).parameters)
            chain.append((klass, params))
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
                break
    return chain


def _settings(params: dict[str, inspect.Parameter]) -> list[str]:
    return [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD and n not in ("self", "vocab_size")]


def check_model_arguments(name: Any, arguments: dict[str, Any]) -> tuple[type[LanguageModel], dict[str, Any]]:
    """Type-check ``arguments`` (``heads`` included) against the constructors of the body and its heads;
    returns (the class, its constructor's arguments)."""
    if "vocab_size" in arguments:
        raise ConfigError("model.vocab_size is set from the data's vocabulary; remove it from the model config")
    cls, constructor_arguments = resolve(name, arguments)
    chain = _constructor_chain(cls)
    valid = [setting for _, params in chain for setting in _settings(params)]
    for key in constructor_arguments:
        if key in valid:
            continue
        owner = next((head for head, mixin in HEADS.items() if key in _settings(_own_parameters(mixin))), None)
        if owner is not None:
            raise ConfigError(
                f"model.{key} is a setting of the {owner} head, which this model has not; add it with "
                f"model.heads=[{owner}] (or drop model.{key})"
            )
        raise ConfigError(f"model.{key} is not a setting of {cls.__name__}; valid keys: {', '.join(valid)}, heads")
    for klass, params in chain:  # every key is someone's: now the values, each against its own constructor
        own = {key: value for key, value in constructor_arguments.items() if key in params}
        check_arguments(klass, own, "model", hydra_keys=False)
    return cls, constructor_arguments


def _own_parameters(mixin: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(vars(mixin)["__init__"]).parameters) if "__init__" in vars(mixin) else {}


def build_model(name: str, vocab_size: int, **arguments: Any) -> LanguageModel:
    """The one way lmlab builds a model, from the config group or from a checkpoint: the registry's body and
    heads with type-checked plain arguments — never anything a file names by import path. (lmlab's own runs
    check the arguments where they come in — :func:`lmlab.validation.validate_config` for a config,
    :func:`lmlab.training.checkpoint_format.load_checkpoint` for a file — then build from :func:`resolve`,
    so that each is checked once.)"""
    cls, constructor_arguments = check_model_arguments(name, arguments)
    return cls(vocab_size, **constructor_arguments)
