"""Config → objects: the only place that calls ``hydra.utils.instantiate``.

Entry points compose a config and hand it here; everything below this module takes plain arguments.
Models are built through the registry (:func:`lmlab.models.compose.resolve`), not instantiate.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lmlab.data.rebuild import build_dataset
from lmlab.errors import ConfigError, LmlabError
from lmlab.evaluation.methods import METHODS
from lmlab.loggers import LOGGERS, ConsoleLogger, Logger, MultiLogger
from lmlab.models import LanguageModel, ReadsTrainingText
from lmlab.models.compose import resolve
from lmlab.models.shapes import TRAINING_COPIES, refuse_unless_fits
from lmlab.runtime import banner, distributed
from lmlab.runtime.devices import resolve_precision
from lmlab.training.hooks import Hook
from lmlab.training.optim import Schedule, takes_sparse_gradients
from lmlab.training.trainer import Trainer
from lmlab.validation import SAMPLING_SETTINGS, model_arguments, validate_config


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with plain Python containers, surfacing lmlab's own errors as they are."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, LmlabError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def import_plugins(modules: list[str] | None) -> None:
    """Import the modules named by ``plugins=[...]`` (the user's own models register themselves there).
    Only the command line names them; a checkpoint never does."""
    for name in modules or []:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"plugins: cannot import {name!r} ({err}); check the name and PYTHONPATH") from None


def require_checkpoint(cfg: DictConfig) -> str:
    """The ``checkpoint=`` path of generate/evaluate, or one line saying it is missing."""
    if OmegaConf.is_missing(cfg, "checkpoint") or not cfg.checkpoint:
        raise ConfigError(
            "checkpoint is not set: give the file to load, e.g. checkpoint=outputs/DAY/TIME/checkpoints/best.pt"
        )
    return str(cfg.checkpoint)


def seed_everything(seed: int | None) -> None:
    if seed is not None:  # seed 0 is a valid seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


LARGE_VOCABULARY = 100_000  # above this, a full softmax costs far more than any recurrent layer


@dataclass
class TrainingObjects:
    device: torch.device
    data: Any
    model: LanguageModel
    optimizer: torch.optim.Optimizer
    schedule: Schedule | None
    trainer: Trainer
    hooks: dict[str, Hook]  # the trainer's hooks by their config name (conf/hooks/), in the order they run


def build_training_objects(
    cfg: DictConfig, say: Callable[[str], None] | None = None, **trainer_overrides: Any
) -> TrainingObjects:
    """Validate and seed, then build device, data, model, optimizer, schedule, hooks and trainer (run, bench).
    ``say`` gets the start banner's lines (:mod:`lmlab.runtime.banner`) as each thing is known: a run prints them."""
    say = say or (lambda line: None)
    import_plugins(cfg.get("plugins"))
    refuse_unread_keys(cfg)
    validate_config(cfg)
    where = distributed.setup()  # several processes (torchrun, SLURM tasks): join the group
    for key in ("batch_size", "eval_batch_size"):
        distributed.check_divisible(cfg.dataset[key], f"dataset.{key}")
    # Each rank draws its own dropout masks; DDP hands every rank rank 0's initial weights.
    seed_everything(None if cfg.seed is None else cfg.seed + where.rank)
    device = build(cfg.device)
    if where.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", where.local_rank)
    if where.world_size > 1 and device.type == "mps":
        raise ConfigError("several processes on Apple MPS are not supported; run one process, or device=cpu")
    precision = resolve_precision(cfg.trainer.precision, device)  # refused before the data is read
    say(banner.device_line(device, precision))
    data = build_dataset(cfg.dataset)
    say(banner.data_line(cfg.dataset.name, data))
    # validate_config checked the arguments; the registry's body and heads build them
    model_cls, constructor_arguments = resolve(cfg.model.name, model_arguments(cfg.model))
    refuse_unless_fits(
        model_cls, len(data.vocab), constructor_arguments, device, TRAINING_COPIES, f"model {cfg.model.name}",
        "lower its sizes (model.hidden_dim, model.embed_dim, model.d_model, layers) or dataset.max_vocab",
    )  # fmt: skip
    model = model_cls(len(data.vocab), **constructor_arguments).to(device)
    if isinstance(model, ReadsTrainingText):
        model.take_corpus(data.corpus.train)
    say(banner.model_line(cfg.model.name + (f", cell {cfg.model.cell}" if cfg.model.get("cell") else ""), model))
    steps = data.stream("train").shard(0, where.world_size).num_windows(cfg.trainer.get("limit_train_batches"))
    say(banner.plan_line(cfg.trainer.get("epochs", 1), steps, data.batch_size, data.bptt, where.world_size))
    if cfg.model.get("softmax") == "full" and len(data.vocab) > LARGE_VOCABULARY and where.is_main:
        print(
            f"note: a full softmax over {len(data.vocab):,} words makes the output layer most of the model's cost; "
            "model.softmax=adaptive is the usual choice here (see +experiment=wt103_lstm)"
        )
    optimizer = build(cfg.optimizer)(model.parameters())
    if model.sparse_gradients and not takes_sparse_gradients(optimizer):
        raise ConfigError(
            f"model {cfg.model.name} makes sparse gradients (model.sparse_embedding=true), which "
            f"{type(optimizer).__name__} cannot take; use optimizer=sgd or optimizer=nt_asgd, or set "
            "model.sparse_embedding=false"
        )
    if model.sparse_gradients and where.world_size > 1 and device.type == "cuda":
        raise ConfigError(
            "model.sparse_embedding=true cannot train on several GPUs (NCCL all-reduces dense gradients "
            "only); set model.sparse_embedding=false"
        )
    schedule = build_schedule(cfg.get("scheduler"), optimizer)
    hooks = build_hooks(cfg.hooks)
    trainer = build(cfg.trainer, hooks=list(hooks.values()), **trainer_overrides)
    return TrainingObjects(device, data, model, optimizer, schedule, trainer, hooks)


REQUIRED_HOOKS = ("checkpoint",)  # a run tests and generates from the best.pt this one writes


def build_hooks(node: DictConfig) -> dict[str, Hook]:
    """The ``hooks`` group's nodes that are set, built in order; each must be a :class:`Hook`."""
    hooks = {}
    for name, spec in node.items():
        if spec is None:
            if name in REQUIRED_HOOKS:
                raise ConfigError(f"hooks.{name} cannot be null: a run keeps its checkpoints through it")
            continue
        hook = build(spec)
        if not isinstance(hook, Hook):
            raise ConfigError(
                f"hooks.{name} builds a {type(hook).__name__}, not a hook; its _target_ must be a subclass of "
                "lmlab.training.hooks.Hook"
            )
        hooks[str(name)] = hook
    return hooks


# The top-level keys of a run (and bench) config besides the evaluation methods' sections (conf/evaluation);
# anything else was added with + and is read by nobody.
RUN_KEYS = {
    "dataset",
    "model",
    "optimizer",
    "scheduler",
    "device",
    "trainer",
    "hooks",
    "generate",
    "logger",
    "seed",
    "plugins",
    "bench",
    "test_with",
}


# The top-level keys lmlab.generate and lmlab.evaluate read (evaluate also each method's section).
GENERATE_KEYS = {"checkpoint", "plugins", "seed", "device", *SAMPLING_SETTINGS}
EVALUATE_KEYS = {"checkpoint", "plugins", "seed", "device", "dataset", "trainer", "split", "method", "output"}


def refuse_unread_keys(cfg: DictConfig, known: set[str] = RUN_KEYS) -> None:
    """A top-level key nothing reads (``+epochs=2``: Hydra's own hint after ``epochs=2`` is refused) would
    be silently ignored; name the key it probably meant instead. ``known``: the command's keys."""
    for key in cfg:
        if key in known or key in METHODS:  # an evaluation method's section: test_with reads it
            continue
        meant = [f"{group}.{key}" for group in known if OmegaConf.is_dict(cfg.get(group)) and key in cfg[group]]
        hint = f"did you mean {meant[0]}={cfg[key]}?" if meant else "remove it"
        raise ConfigError(f"+{key}={cfg[key]} adds a key that nothing reads, so it would do nothing; {hint}")


def build_schedule(node: DictConfig | None, optimizer: torch.optim.Optimizer) -> Schedule | None:
    if not node:
        return None
    settings = OmegaConf.to_container(node, resolve=True)
    interval, warmup_steps = settings.pop("interval", "epoch"), settings.pop("warmup_steps", 0)
    return Schedule(build(settings)(optimizer), interval, warmup_steps)


def build_logger(
    cfg: DictConfig, out_dir: Path, group: str | None = None, name: str | None = None, prefix: str = ""
) -> Logger:
    """Console (+ run.log) and metrics.jsonl always; plus every registered backend the ``logger`` group
    names (``logger.<name>: {options}``), each labelled with the job unless its options say otherwise."""
    loggers: list[Logger] = [ConsoleLogger(out_dir, prefix)]
    chosen = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else {}
    config = OmegaConf.to_container(cfg, resolve=True) if chosen else {}
    for backend, options in chosen.items():
        options = dict(options or {})
        labels = {"group": options.pop("group", None) or group, "name": options.pop("name", None) or name}
        loggers.append(LOGGERS.lookup(backend)(out_dir=str(out_dir), run_config=config, **labels, **options))
    return MultiLogger(loggers)


def checkpoint_meta(cfg: DictConfig, vocab_words: list[str]) -> dict[str, Any]:
    """What every checkpoint carries besides weights: the model's registry name and plain arguments,
    the vocabulary, and the run config (a record for people and tools; never instantiated)."""
    return {
        "model": {"name": cfg.model.name, "arguments": model_arguments(cfg.model)},
        "vocab": vocab_words,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
