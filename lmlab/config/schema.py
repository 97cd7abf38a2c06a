"""Typed settings: the types every setting is checked against, and the checks (for configs and checkpoints).

A setting's type *is* its schema: a constructor annotates each argument (``embed_dim: PositiveInt``,
``dropout: Probability``, ``softmax: Literal["full", "adaptive"]``) and :func:`check_arguments` checks
plain values against those annotations — the command line's values before any work starts, and a
checkpoint's stored model arguments before anything is built from them. Every refusal is one line
naming the key, the value and what it must be. Constructors keep only checks that involve several
arguments together.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from lmlab.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """A range rule attached to a type with ``Annotated``; ``expected`` completes "it must be ..."."""

    holds: Callable[[Any], bool]
    expected: str


PositiveInt = Annotated[int, Rule(lambda v: v > 0, "a positive integer")]
NonNegativeInt = Annotated[int, Rule(lambda v: v >= 0, "an integer >= 0")]
PositiveFloat = Annotated[float, Rule(lambda v: 0 < v < math.inf, "a finite number > 0")]
NonNegativeFloat = Annotated[float, Rule(lambda v: 0 <= v < math.inf, "a finite number >= 0")]
Probability = Annotated[float, Rule(lambda v: 0 <= v < 1, "a number in [0, 1)")]
UnitInterval = Annotated[float, Rule(lambda v: 0 <= v <= 1, "a number in [0, 1]")]
# Positions a model keeps in its state per column (a pointer's window, a KV cache): the state is this many
# feature vectors per column, allocated at the first window, so a size a file states is bounded before then.
MAX_LOOK_BACK = 10_000
LookBack = Annotated[int, Rule(lambda v: 0 < v <= MAX_LOOK_BACK, f"a positive integer up to {MAX_LOOK_BACK:,}")]
# Layers a model stacks: each is Python objects built before any weight is read, so a count a file states is
# bounded before the model is built (the deepest published language models have a few hundred).
MAX_LAYERS = 1_000
LayerCount = Annotated[int, Rule(lambda v: 0 < v <= MAX_LAYERS, f"a positive integer up to {MAX_LAYERS:,}")]
# seed + process rank seeds numpy, which takes 32 bits
Seed = Annotated[int, Rule(lambda v: 0 <= v <= 2**32 - 2**16, "an integer from 0 to 4294901760")]
IncreasingInts = Annotated[
    list[PositiveInt] | tuple[PositiveInt, ...],
    Rule(lambda v: len(v) > 0 and list(v) == sorted(set(v)), "a list of increasing positive integers"),
]


def conforms(value: Any, hint: Any) -> bool:
    """Whether a plain value (YAML/JSON-like data) fits a type hint. ``bool`` is not an ``int`` here,
    and an ``int`` is a ``float``; containers are checked element by element."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Annotated:
        return conforms(value, args[0]) and all(
            rule.holds(value) for rule in hint.__metadata__ if isinstance(rule, Rule)
        )
    if origin in (Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if origin is Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if origin in (list, tuple, abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        element = args[0] if args else Any
        return all(conforms(v, element) for v in value)
    if origin in (dict, abc.Mapping):
        key_hint, value_hint = args if args else (Any, Any)
        return isinstance(value, dict) and all(
            conforms(k, key_hint) and conforms(v, value_hint) for k, v in value.items()
        )
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this checker does not model (a TypeVar, a Protocol, ...) is not enforced


def describe(hint: Any) -> str:
    """What a value of ``hint`` must be, for error messages ("a positive integer or null")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        rules = [rule.expected for rule in hint.__metadata__ if isinstance(rule, Rule)]
        return " and ".join(rules) if rules else describe(args[0])
    if origin in (Union, types.UnionType):
        parts = [describe(arg) for arg in args if arg is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (list, tuple, abc.Sequence):
        return f"a list of {describe(args[0]) if args else 'values'}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_value(key: str, value: Any, hint: Any) -> None:
    if not conforms(value, hint):
        problem = f"{key}={value!r} is invalid: it must be {describe(hint)}"
        fix = f"Fix it with {key}=VALUE on the command line or in your config."
        raise ConfigError(f"{problem}. {fix}", key=key, problem=problem, fix=fix)


def argument_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """The annotated arguments of a function or class constructor (``Annotated`` extras kept)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable annotations (third-party code): nothing to enforce
        hints = {}
    hints.pop("return", None)
    return hints


def check_arguments(
    fn: Callable[..., Any],
    values: Mapping[str, Any],
    prefix: str,
    extra_hints: Mapping[str, Any] | None = None,
    hydra_keys: bool = True,
) -> None:
    """Refuse keys that ``fn`` does not take and values that break its annotations (or ``extra_hints``,
    for third-party callables without useful ones). Hydra's own keys (``_target_``, ``_partial_``) are
    skipped unless ``hydra_keys`` is False (plain arguments, as a model's are)."""
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    hints = {**argument_hints(fn), **(extra_hints or {})}
    for key, value in values.items():
        if hydra_keys and key.startswith("_"):
            continue
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in params and not takes_any:
            valid = ", ".join(k for k, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD and k != "self")
            raise ConfigError(f"{dotted} is not a setting of {getattr(fn, '__name__', fn)}; valid keys: {valid}")
        if key in hints:
            check_value(dotted, value, hints[key])
