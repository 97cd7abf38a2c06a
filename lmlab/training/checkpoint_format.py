"""The checkpoint format: what a checkpoint holds, and safe reads (writes go through
:func:`lmlab.runtime.files.atomic_save`; resuming is :mod:`lmlab.training.resume`, RNG state :mod:`lmlab.training.rng`).

A checkpoint is a plain dict of tensors, numbers, strings and lists, so it loads with
``torch.load(path, weights_only=True)`` and never runs code. It carries the vocabulary and the model as
``{"name": <registered name>, "arguments": {plain values}}``, so generation and evaluation need nothing
but the file. The model is rebuilt only through the registry (:func:`lmlab.models.compose.resolve`), with
every argument type-checked first; the run config stored beside it is a record, never instantiated.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.data.datasets import EOS, UNK, Vocabulary
from lmlab.errors import CheckpointError, ConfigError, LmlabError, printable
from lmlab.models import LanguageModel, check_model_arguments
from lmlab.models.compose import resolve
from lmlab.models.shapes import check_fits, on_meta
from lmlab.training.rng import rng_state

FORMAT = "lmlab-checkpoint"
EXTRA_STATE = "_extra_state"  # the state-dict key of what a module's get_extra_state returns (nn.Module's)
VERSION = 2


@dataclass
class TrainState:
    """Where training stands; saved in ``last.pt`` so a run resumes exactly."""

    epoch: int = 1  # the epoch in progress (1-based)
    step: int = 0  # batches done in that epoch
    global_step: int = 0
    best_val_loss: float = math.inf
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics dict per finished epoch
    hidden: Any = None  # the model's state after `step` (RNN hidden state, KV cache; None at an epoch start)
    loss_sum: float = 0.0  # train loss summed over this epoch's finished steps
    skipped_batches: int = 0
    elapsed_s: float = 0.0  # training wall time across resumes (the time budget's clock; every rank agrees)
    weight_average: dict[str, torch.Tensor] | None = None  # hooks.weight_averaging's mean (None: not started)
    averaged_steps: int = 0  # steps in that mean
    dropout_scale: float | None = None  # hooks.dropout_budget's factor on the model's dropout (None: not decided)

    def start_next_epoch(self) -> None:
        """The epoch just validated is done: the next one starts at its first step, from a fresh state."""
        self.epoch += 1
        self.step, self.hidden, self.loss_sum, self.skipped_batches = 0, None, 0.0, 0


def training_checkpoint(
    meta: dict[str, Any],
    model: torch.nn.Module,
    state: TrainState,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    logger_state: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a checkpoint holds: ``meta`` (``model`` name and arguments, ``vocab``, the run ``config``),
    the weights and the progress; with an ``optimizer`` also everything needed to resume (``last.pt``)."""
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        **meta,
        "model_state": model.state_dict(),
        "epoch": state.epoch,
        "best_val_loss": state.best_val_loss,
        "history": state.history,
    }
    if optimizer is not None:
        ckpt.update(
            optimizer_state=optimizer.state_dict(),
            scheduler_state=None if scheduler is None else scheduler.state_dict(),
            scaler_state=None if scaler is None else scaler.state_dict(),
            step=state.step,
            global_step=state.global_step,
            hidden=state.hidden,
            loss_sum=state.loss_sum,
            skipped_batches=state.skipped_batches,
            elapsed_s=state.elapsed_s,
            weight_average=state.weight_average,
            averaged_steps=state.averaged_steps,
            dropout_scale=state.dropout_scale,
            rng=rng or rng_state(),
            logger_state=logger_state or {},
        )
    return ckpt


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and sanity-check a checkpoint, refusing anything that is not a plain lmlab checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if _head(path).startswith(b"PK\x03\x04"):  # a whole torch file, with objects weights_only refuses
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects other than tensors and plain data, which lmlab "
                "never loads (weights_only=True blocked them, nothing was executed)"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint: it is {_looks_like(path)}") from err
    except Exception as err:  # torch raises many types for damaged files; all mean "unreadable"
        raise CheckpointError(f"{path} is not a readable checkpoint: it is {_looks_like(path)}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a torch file but not an lmlab checkpoint (no '{FORMAT}' marker)")
    version = state.get("version")
    if type(version) is int and version == 1:
        _upgrade_version_1(state)
        version = state.get("version")
    if type(version) is not int or version != VERSION:
        shown = version if type(version) is int else f"{printable(repr(version))} (not a number)"
        raise CheckpointError(f"{path} has checkpoint version {shown}; this lmlab reads {VERSION}")
    model = state.get("model")
    if not (isinstance(model, dict) and isinstance(model.get("arguments"), dict) and len(model) == 2):
        raise CheckpointError(f"{path} has no valid model entry (a name and plain arguments); it was not made by lmlab")
    try:
        check_model_arguments(model.get("name"), model["arguments"])
    except ConfigError as err:  # the file's values, not the user's: the command-line fix does not apply
        raise CheckpointError(f"refused to build the model stored in {path}: {err.problem}") from None
    vocab = state.get("vocab")
    if not (isinstance(vocab, list) and len(vocab) >= 2 and all(isinstance(w, str) for w in vocab)):
        raise damaged(path, "vocab", "is not a list of words")
    if len(set(vocab)) != len(vocab):
        raise damaged(path, "vocab", "names a word twice")
    if not {UNK, EOS} <= set(vocab):
        raise damaged(path, "vocab", f"lacks {UNK} or {EOS}, which every lmlab vocabulary has")
    weights = state.get("model_state")
    if not (isinstance(weights, dict) and weights and all(isinstance(t, torch.Tensor) for t in weights.values())):
        raise damaged(path, "model_state", "is not a dict of tensors")
    inflated = _inflated_tensor(state)
    if inflated is not None:
        name, tensor = inflated
        raise damaged(
            path, printable(name, 80), f"claims {tensor.numel():,} values over {tensor.untyped_storage().nbytes():,} "
            "bytes of data (a stretched view, not stored values)",
        )  # fmt: skip
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{path} holds non-finite weights (NaN or inf in {printable(name)}): nothing it computes would "
                "mean anything; use an earlier checkpoint"
            )
    return state


def _inflated_tensor(value: Any, name: str = "") -> tuple[str, torch.Tensor] | None:
    """The first tensor anywhere in ``value`` whose values are not all stored (an expanded view: stride 0 over
    one stored value can claim 10**12 elements, and anything that reads them all allocates terabytes)."""
    if isinstance(value, torch.Tensor):
        stored = value.untyped_storage().nbytes() - value.storage_offset() * value.element_size()
        return (name, value) if value.numel() * value.element_size() > stored else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _inflated_tensor(item, f"{name}.{key}" if name else str(key))
        if found is not None:
            return found
    return None


def damaged(path: str | os.PathLike, field: str, what: str) -> CheckpointError:
    """The one message for a checkpoint field that is missing or wrong: the file, the field, what to do."""
    return CheckpointError(
        f"{path} is damaged: its field '{field}' {what}; use another checkpoint (or start afresh with "
        "hooks.checkpoint.resume=null)"
    )


def load_weights(path: str | os.PathLike, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(weights)``, checked first: the same names and shapes (no partial loads,
    no broadcasting), else one line saying the file does not fit."""
    expected = model.state_dict()
    shaped = [k for k in expected if not k.endswith(EXTRA_STATE)]  # a module's extra state: its own to check
    wrong = sorted(set(expected) ^ set(weights)) or [k for k in shaped if expected[k].shape != weights[k].shape]
    kinds = [k for k in shaped if not wrong and expected[k].is_floating_point() != weights[k].is_floating_point()]
    if kinds:  # integer weights would be cast and used, giving figures that mean nothing
        raise damaged(path, f"model_state.{printable(kinds[0], 80)}", "holds integers where the model has real numbers")
    if wrong:
        raise CheckpointError(
            f"{path} does not fit its model: the weights of {printable(', '.join(wrong[:3]))} are missing, extra "
            "or of another shape; use a checkpoint made by this model"
        )
    try:
        model.load_state_dict(weights)
    except CheckpointError as err:  # a module refused its extra state (e.g. an n-gram's text)
        raise CheckpointError(f"{path} is damaged: {err}; use another checkpoint") from None


def _head(path: Path, size: int = 4096) -> bytes:
    """The first bytes of a file (not the whole of a checkpoint that may be hundreds of MB)."""
    with path.open("rb") as f:
        return f.read(size)


def _looks_like(path: Path) -> str:
    """What an unreadable file is, from its first bytes (for the error message)."""
    head = _head(path)
    if not head:
        return "empty (0 bytes; a copy or download that never finished)"
    if head.startswith(b"PK\x03\x04"):
        return "a torch file that is truncated or damaged"
    if head[:1] == b"\x80":
        return "a Python pickle, not a torch checkpoint (lmlab never unpickles code; nothing was executed)"
    try:
        head.decode("utf-8")
        return "a text file, not a checkpoint"
    except UnicodeDecodeError:
        return "not a checkpoint (unrecognised binary data)"


def _upgrade_version_1(state: dict[str, Any]) -> None:
    """Version 1 stored the model as a Hydra node; its one model class maps onto the registry's ``rnn``
    (anything else stays version 1 and is refused)."""
    config = state.get("model_config")
    if isinstance(config, dict) and config.get("_target_") == "lmlab.models.RNNLanguageModel":
        arguments = {k: v for k, v in config.items() if k != "_target_"}
        state.update(version=VERSION, model={"name": "rnn", "arguments": arguments})
        del state["model_config"]


def model_from_checkpoint(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[LanguageModel, Vocabulary, dict[str, Any]]:
    """Rebuild the model (in eval mode, on ``device``) and vocabulary saved in a checkpoint."""
    state = load_checkpoint(path)
    vocab = Vocabulary(state["vocab"])
    arguments = state["model"]["arguments"]
    cls, constructor_arguments = resolve(state["model"]["name"], arguments)  # checked by load_checkpoint
    try:  # on the meta device first: no memory is taken before the shapes are known to fit the file
        probe = on_meta(cls, len(vocab), constructor_arguments)
    except LmlabError as err:
        raise CheckpointError(f"refused to build the model stored in {path}: {err}") from None
    except Exception as err:
        raise CheckpointError(
            f"refused to build the model stored in {path}: its arguments {printable(arguments)} make no model "
            f"({type(err).__name__}); it was not made by this lmlab"
        ) from None
    load_weights(path, probe, {k: v.to("meta") for k, v in state["model_state"].items()})
    try:
        check_fits(probe, torch.device(device), 1, f"the model stored in {path}", "it was not made for this machine")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    model = cls(len(vocab), **constructor_arguments)
    load_weights(path, model, state["model_state"])
    return model.to(device).eval(), vocab, state
