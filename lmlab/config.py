"""Early checks of a composed run config: every bad value stops before any work, naming key and fix.

Hydra already rejects unknown keys (struct mode) and unknown group options; this module checks the
values' types and ranges, which YAML and the command line cannot express.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from lmlab.errors import ConfigError


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


POSITIVE_INT = (lambda v: _is_int(v) and v > 0, "a positive integer")
OPTIONAL_POSITIVE_INT = (lambda v: v is None or (_is_int(v) and v > 0), "a positive integer or null")
NON_NEGATIVE_INT = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
POSITIVE_NUMBER = (lambda v: _is_number(v) and v > 0, "a number > 0")
OPTIONAL_POSITIVE_NUMBER = (lambda v: v is None or (_is_number(v) and v > 0), "a number > 0 or null")
PROBABILITY = (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
BOOL = (lambda v: isinstance(v, bool), "true or false")
OPTIONAL_INT = (lambda v: v is None or _is_int(v), "an integer or null")

# key → (check, what it must be). Keys absent from a config (e.g. another model's options) are skipped.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dataset.batch_size": POSITIVE_INT,
    "dataset.eval_batch_size": POSITIVE_INT,
    "dataset.bptt": POSITIVE_INT,
    "model.embed_dim": POSITIVE_INT,
    "model.hidden_dim": POSITIVE_INT,
    "model.num_layers": POSITIVE_INT,
    "model.dropout": PROBABILITY,
    "model.tie_weights": BOOL,
    "model.dropout_embedding": PROBABILITY,
    "model.weight_drop": PROBABILITY,
    "model.locked_dropout": BOOL,
    "model.sparse_embedding": BOOL,
    "model.ar_alpha": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "model.tar_beta": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "optimizer.lr": POSITIVE_NUMBER,
    "optimizer.weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "trainer.epochs": POSITIVE_INT,
    "trainer.clip_grad_norm": OPTIONAL_POSITIVE_NUMBER,
    "trainer.limit_train_batches": OPTIONAL_POSITIVE_INT,
    "trainer.limit_eval_batches": OPTIONAL_POSITIVE_INT,
    "trainer.log_interval": POSITIVE_INT,
    "trainer.save_every_steps": OPTIONAL_POSITIVE_INT,
    "trainer.max_time_s": OPTIONAL_POSITIVE_NUMBER,
    "generate.num_words": NON_NEGATIVE_INT,
    "generate.temperature": POSITIVE_NUMBER,
    "generate.top_k": OPTIONAL_POSITIVE_INT,
    "seed": OPTIONAL_INT,
}


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first value that breaks a rule in :data:`RULES`."""
    for key, (ok, expected) in RULES.items():
        node: Any = cfg
        for part in key.split("."):
            if not isinstance(node, DictConfig) or part not in node:
                node = _MISSING
                break
            node = node[part]
        if node is _MISSING:
            continue
        if not ok(node):
            raise ConfigError(
                f"{key}={node!r} is invalid: it must be {expected}. Fix it with {key}=VALUE "
                "on the command line or in your config."
            )


_MISSING = object()
