"""Resuming a run from its ``last.pt`` (and starting one from another run's weights, ``init_from``).

The file is data, checked field by field before anything trusts it: every progress value has a rule
(``PROGRESS``), every restored state (optimizer, scheduler, scaler, RNG, hidden state, per-rank shares)
fails as one line naming the file and the field (:func:`lmlab.training.checkpoint_format.damaged`), and the run config
stored in it only tells which of this run's settings changed — none of its own values is applied.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import CheckpointError, LmlabError, printable
from lmlab.models import map_tensors
from lmlab.runtime import distributed
from lmlab.training.checkpoint_format import TrainState, damaged, load_checkpoint, load_weights
from lmlab.training.rng import set_rng_state


def restore_training(
    path: str | os.PathLike, meta: dict[str, Any], model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any
) -> tuple[TrainState, dict[str, Any]]:
    """Load a ``last.pt`` into model/optimizer/scheduler/scaler and the RNGs; returns the progress
    and the logger's saved state. Refuses checkpoints of another vocabulary or model config."""
    ckpt = load_checkpoint(path)
    if not _same_model(ckpt, meta):
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with another vocabulary or model "
            "config; use hooks.checkpoint.resume=null or a fresh hydra.run.dir"
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
    for group in optimizer.param_groups:  # the file's LR, unless this run's config set another just above
        lr = group.get("lr")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise damaged(path, "optimizer_state", f"has the learning rate {printable(lr, 40)}")
    own = _own_share(path, ckpt)
    with _field(path, "rng"):
        set_rng_state(own["rng"])
    device = next(model.parameters()).device
    with _field(path, "hidden"):
        hidden = map_tensors(own["hidden"], lambda t: t.to(device))
    average = _weight_average(path, ckpt.get("weight_average"), model)
    _check_averaged_steps(path, progress, average)
    logger_state = ckpt.get("logger_state")
    state = TrainState(**progress, hidden=hidden, weight_average=average)
    return state, logger_state if isinstance(logger_state, dict) else {}


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
# Fields older checkpoints may lack: their default when absent, and what each must be when present.
OPTIONAL_PROGRESS = {
    "elapsed_s": (0.0, lambda v: isinstance(v, float) and math.isfinite(v) and v >= 0),
    "averaged_steps": (0, lambda v: type(v) is int and v >= 0),
    "dropout_scale": (None, lambda v: v is None or (isinstance(v, float) and 0.0 <= v <= 1.0)),
}


def _progress(path: str | os.PathLike, ckpt: dict[str, Any]) -> dict[str, Any]:
    for key, valid in PROGRESS.items():
        if not valid(ckpt.get(key)):
            raise damaged(path, key, f"is {printable(ckpt.get(key), 60)}, not a valid value")
    progress = {key: ckpt[key] for key in PROGRESS}
    # The epoch in progress follows the finished ones in its history; its steps are among the run's.
    if progress["epoch"] != len(progress["history"]) + 1:
        raise damaged(path, "epoch", f"is {progress['epoch']} after {len(progress['history'])} finished epochs")
    if progress["step"] > progress["global_step"]:
        raise damaged(path, "step", f"is {progress['step']}, past the run's {progress['global_step']} steps in all")
    for key, (default, valid) in OPTIONAL_PROGRESS.items():
        progress[key] = ckpt.get(key, default)
        if not valid(progress[key]):
            raise damaged(path, key, f"is {printable(progress[key], 60)}, not a valid value")
    return progress


def _weight_average(path: str | os.PathLike, average: Any, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """hooks.weight_averaging's mean (lmlab.training.hooks.weight_averaging), checked against the model it averages."""
    if average is None:
        return None
    params = dict(model.named_parameters())
    fits = isinstance(average, dict) and set(average) == set(params)
    fits = fits and all(
        isinstance(t, torch.Tensor) and t.shape == params[k].shape and t.dtype == params[k].dtype
        for k, t in average.items()
    )
    if not fits:
        raise damaged(path, "weight_average", "is not a mean of this model's weights")
    if not all(bool(torch.isfinite(t).all()) for t in average.values()):
        raise damaged(path, "weight_average", "holds non-finite values")
    return {k: t.to(params[k].device) for k, t in average.items()}


def _check_averaged_steps(path: str | os.PathLike, progress: dict[str, Any], average: Any) -> None:
    """The mean and its step count are saved together; one without the other would restart or skew the mean."""
    steps = progress["averaged_steps"]
    if average is not None and steps == 0:
        raise damaged(path, "averaged_steps", "is 0 while weight_average holds a mean")
    if average is None and steps > 0:
        raise damaged(path, "averaged_steps", f"is {steps} while weight_average holds no mean")
    if steps > progress["global_step"]:
        raise damaged(path, "averaged_steps", f"is {steps}, more than the run's {progress['global_step']} steps")


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
            f"hooks.checkpoint.init_from={path} is not a file; give the checkpoint whose weights this run starts from, "
            "e.g. hooks.checkpoint.init_from=outputs/DAY/TIME/checkpoints/best.pt"
        )
    ckpt = load_checkpoint(path)
    if not _same_model(ckpt, meta):
        raise CheckpointError(
            f"hooks.checkpoint.init_from={path} holds another model or vocabulary than this run's; give a checkpoint "
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
            "start afresh with hooks.checkpoint.resume=null (or a new hydra.run.dir)"
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
