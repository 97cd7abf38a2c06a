"""Checkpoint contents and safe reads (writes go through :func:`lmlab.files.atomic_save`).

A checkpoint is a plain dict of tensors, numbers, strings and lists, so it loads with
``torch.load(path, weights_only=True)`` and never runs code. It carries the vocabulary and the model as
``{"name": <registered name>, "arguments": {plain values}}``, so generation and evaluation need nothing
but the file. The model is rebuilt only through the registry (:func:`lmlab.models.build_model`), with
every argument type-checked first; the run config stored beside it is a record, never instantiated.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.data import Vocabulary
from lmlab.errors import CheckpointError, LmlabError, printable
from lmlab.models import LanguageModel, build_model, check_model_arguments, map_tensors

FORMAT = "lmlab-checkpoint"
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
            rng=rng or rng_state(),
            logger_state=logger_state or {},
        )
    return ckpt


def restore_training(
    path: str | os.PathLike, meta: dict[str, Any], model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any
) -> tuple[TrainState, dict[str, Any]]:
    """Load a ``last.pt`` into model/optimizer/scheduler/scaler and the RNGs; returns the progress
    and the logger's saved state. Refuses checkpoints of another vocabulary or model config."""
    ckpt = load_checkpoint(path)
    if not _same_model(ckpt, meta):
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with another vocabulary or model "
            "config; use trainer.resume=null or a fresh hydra.run.dir"
        )
    if "optimizer_state" not in ckpt:
        raise CheckpointError(f"cannot resume from {path}: it holds weights only (a best.pt); use last.pt")
    progress = _progress(path, ckpt)
    load_weights(path, model, ckpt["model_state"])
    with _field(path, "optimizer_state"):
        optimizer.load_state_dict(ckpt["optimizer_state"])
    with _field(path, "scheduler_state"):
        if scheduler is not None and ckpt.get("scheduler_state") is not None:
            scheduler.load_state_dict(ckpt["scheduler_state"])
    with _field(path, "scaler_state"):
        if scaler is not None and ckpt.get("scaler_state") is not None:
            scaler.load_state_dict(ckpt["scaler_state"])
    for line in apply_changed_settings(
        path, _dict(ckpt.get("config")), _dict(meta.get("config")), optimizer, scheduler
    ):
        print(f"resume: {line}")
    own = _own_share(path, ckpt)
    with _field(path, "rng"):
        set_rng_state(own["rng"])
    device = next(model.parameters()).device
    with _field(path, "hidden"):
        hidden = map_tensors(own["hidden"], lambda t: t.to(device))
    logger_state = ckpt.get("logger_state")
    return TrainState(**progress, hidden=hidden), logger_state if isinstance(logger_state, dict) else {}


# A last.pt's progress fields and what each must be (a resumed run's loop trusts them).
PROGRESS = {
    "epoch": lambda v: type(v) is int and v >= 1,
    "step": lambda v: type(v) is int and v >= 0,
    "global_step": lambda v: type(v) is int and v >= 0,
    "best_val_loss": lambda v: isinstance(v, float) and not math.isnan(v) and v >= 0,
    "history": lambda v: isinstance(v, list) and all(isinstance(m, dict) and _plain_json(m) for m in v),
    "loss_sum": lambda v: isinstance(v, float) and math.isfinite(v),
    "skipped_batches": lambda v: type(v) is int and v >= 0,
}


def _progress(path: str | os.PathLike, ckpt: dict[str, Any]) -> dict[str, Any]:
    for key, valid in PROGRESS.items():
        if not valid(ckpt.get(key)):
            raise damaged(path, key, f"is {printable(ckpt.get(key), 60)}, not a valid value")
    return {key: ckpt[key] for key in PROGRESS}


def _plain_json(value: Any) -> bool:
    """Whether ``value`` is what metrics.jsonl can hold (it is written back from a resumed history)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@contextlib.contextmanager
def _field(path: str | os.PathLike, name: str) -> Iterator[None]:
    """Restoring one field of a last.pt: whatever it breaks on is one line naming the file and the field."""
    try:
        yield
    except LmlabError:
        raise
    except Exception as err:
        raise damaged(path, name, f"cannot be restored ({type(err).__name__})") from None


def _own_share(path: str | os.PathLike, ckpt: dict[str, Any]) -> dict[str, Any]:
    """This process's RNG and model state: a checkpoint of several processes keeps one per rank."""
    from lmlab import distributed

    where = distributed.place()
    ranks = ckpt.get("ranks") or [{"rng": ckpt.get("rng"), "hidden": ckpt.get("hidden")}]
    if not (isinstance(ranks, list) and all(isinstance(r, dict) and {"rng", "hidden"} <= set(r) for r in ranks)):
        raise damaged(path, "ranks", "is not a list of each process's rng and hidden state")
    if len(ranks) == where.world_size:
        return ranks[where.rank]
    if ckpt["step"]:  # mid-epoch: each rank's state belongs to its own columns
        raise CheckpointError(
            f"{path} was saved mid-epoch by {len(ranks)} process(es); resume it with {len(ranks)} "
            f"(this run has {where.world_size}), or from a checkpoint saved at an epoch's end"
        )
    return ranks[0] if where.rank >= len(ranks) else ranks[where.rank]


def initial_weights(path: str | os.PathLike, meta: dict[str, Any], model: torch.nn.Module) -> None:
    """Load another run's weights (not its progress or optimizer) into ``model``: fine-tuning."""
    if not Path(path).is_file():
        raise CheckpointError(
            f"trainer.init_from={path} is not a file; give the checkpoint whose weights this run starts from, "
            "e.g. trainer.init_from=outputs/DAY/TIME/checkpoints/best.pt"
        )
    ckpt = load_checkpoint(path)
    if not _same_model(ckpt, meta):
        raise CheckpointError(
            f"trainer.init_from={path} holds another model or vocabulary than this run's; give a checkpoint "
            "of the same model and data"
        )
    load_weights(path, model, ckpt["model_state"])


def _same_model(ckpt: dict[str, Any], meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's weights fit this run: the same registered model, arguments and vocabulary."""
    return ckpt["vocab"] == meta["vocab"] and ckpt["model"] == meta["model"]


# Changing these mid-run would change what the saved state means (window shapes, the text itself).
FIXED_ON_RESUME = ("dataset",)


def apply_changed_settings(
    path: str | os.PathLike, saved: dict[str, Any], current: dict[str, Any], optimizer: Any, scheduler: Any
) -> list[str]:
    """Settings that differ between the checkpoint's run config and this run's: optimizer and scheduler
    values are applied over the restored state (the checkpoint's own lr would otherwise win silently),
    trainer/logger/other values simply take effect, dataset changes are refused. Returns one line per
    change, e.g. ``optimizer.lr: 20 -> 5 (applied)``."""
    changes = [(key, old, new) for key, old, new in _differences(saved, current) if not key.startswith("hydra.")]
    refused = [
        f"{printable(k, 80)}: {o!r} -> {n!r}"  # keys come from the file too: escaped
        for k, o, n in changes
        if k.split(".")[0] in FIXED_ON_RESUME or k.endswith("_target_")
    ]
    if refused:
        raise CheckpointError(
            f"cannot resume from {path} with these changed settings: {'; '.join(refused[:5])}. Restore them, or "
            "start afresh with trainer.resume=null (or a new hydra.run.dir)"
        )
    lines = []
    for key, old, new in changes:
        group, _, name = key.partition(".")
        mine = current.get(group)
        applied = group in ("optimizer", "scheduler") and isinstance(mine, dict) and name in mine  # this run's only
        if applied and group == "optimizer" and any(name in g for g in optimizer.param_groups):
            for param_group in optimizer.param_groups:
                param_group[name] = new
        elif applied and group == "scheduler" and scheduler is not None and hasattr(scheduler, name):
            setattr(scheduler, name, new)
        lines.append(f"{printable(key, 80)}: {old!r} -> {new!r}" + (" (applied)" if applied else ""))
    return lines[:50]


def _differences(saved: Any, current: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [d for k in keys for d in _differences(saved.get(k), current.get(k), f"{prefix}{k}.")]
    return [] if saved == current else [(prefix.rstrip("."), saved, current)]


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
        shown = version if type(version) is int else f"{printable(version)} (not a number)"
        raise CheckpointError(f"{path} has checkpoint version {shown}; this lmlab reads {VERSION}")
    model = state.get("model")
    if not (isinstance(model, dict) and isinstance(model.get("arguments"), dict) and len(model) == 2):
        raise CheckpointError(f"{path} has no valid model entry (a name and plain arguments); it was not made by lmlab")
    try:
        check_model_arguments(model.get("name"), model["arguments"])
    except LmlabError as err:
        raise CheckpointError(f"refused to build the model stored in {path}: {str(err).split('. Fix it')[0]}") from None
    vocab = state.get("vocab")
    if not (isinstance(vocab, list) and len(vocab) >= 2 and all(isinstance(w, str) for w in vocab)):
        raise damaged(path, "vocab", "is not a list of words")
    weights = state.get("model_state")
    if not (isinstance(weights, dict) and weights and all(isinstance(t, torch.Tensor) for t in weights.values())):
        raise damaged(path, "model_state", "is not a dict of tensors")
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{path} holds non-finite weights (NaN or inf in {printable(name)}): nothing it computes would "
                "mean anything; use an earlier checkpoint"
            )
    return state


def damaged(path: str | os.PathLike, field: str, what: str) -> CheckpointError:
    """The one message for a checkpoint field that is missing or wrong: the file, the field, what to do."""
    return CheckpointError(
        f"{path} is damaged: its field '{field}' {what}; use another checkpoint (or start afresh with "
        "trainer.resume=null)"
    )


def load_weights(path: str | os.PathLike, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(weights)``, checked first: the same names and shapes (no partial loads,
    no broadcasting), else one line saying the file does not fit."""
    expected = model.state_dict()
    wrong = sorted(set(expected) ^ set(weights)) or [k for k in expected if expected[k].shape != weights[k].shape]
    if wrong:
        raise CheckpointError(
            f"{path} does not fit its model: the weights of {printable(', '.join(wrong[:3]))} are missing, extra "
            "or of another shape; use a checkpoint made by this model"
        )
    model.load_state_dict(weights)


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
    name, arguments = state["model"]["name"], state["model"]["arguments"]
    try:  # on the meta device first: no memory is taken before the shapes are known to fit the file
        with torch.device("meta"):
            probe = build_model(name, len(vocab), **arguments)
    except LmlabError as err:
        raise CheckpointError(f"refused to build the model stored in {path}: {err}") from None
    except Exception as err:
        raise CheckpointError(
            f"refused to build the model stored in {path}: its arguments {printable(arguments)} make no model "
            f"({type(err).__name__}); it was not made by this lmlab"
        ) from None
    load_weights(path, probe, {k: v.to("meta") for k, v in state["model_state"].items()})
    model = build_model(name, len(vocab), **arguments)
    load_weights(path, model, state["model_state"])
    return model.to(device).eval(), vocab, state


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from (torch, CUDA, numpy, python), as weights_only-safe values."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        from lmlab import distributed

        if distributed.place().world_size > 1:  # this rank's GPU only: reading the others opens a context on each
            state["cuda_current"] = torch.cuda.get_rng_state()
        else:
            state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_current" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_current"])
