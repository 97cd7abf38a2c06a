"""Validation of a composed config, for every command: every bad value stops before any work, naming key,
value and fix. (A checkpoint's stored values are checked where it is read, with the same schema:
:func:`lmlab.training.checkpoint_format.load_checkpoint`.)

Hydra rejects unknown keys (struct mode) and unknown group options. The values are checked here against
the annotated signature of whatever each group builds (:mod:`lmlab.config.schema`): the registered
model's and dataset's constructors, each hook's and logger's, the ``_target_`` for the other groups,
:func:`lmlab.evaluation.sampling.sample_words` for ``generate``, the chosen evaluation method's
signature for ``lmlab.evaluate``. Third-party targets (torch optimizers and schedulers) get the few rules
below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from lmlab.config.schema import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Seed,
    check_arguments,
    check_value,
)
from lmlab.data.datasets import DATASETS
from lmlab.errors import ConfigError, printable
from lmlab.evaluation.methods import METHODS, method_settings
from lmlab.evaluation.sampling import sample_words
from lmlab.loggers import LOGGERS
from lmlab.models import check_model_arguments
from lmlab.training.hooks import Hook
from lmlab.training.optim import Schedule

# Rules for arguments whose target does not annotate them usefully (torch's own classes).
OPTIMIZER_HINTS = {"lr": PositiveFloat, "weight_decay": NonNegativeFloat}
TOP_LEVEL_HINTS = {"seed": Seed | None, "plugins": list[str], "test_with": list[str]}
BENCH_HINTS = {
    "steps": PositiveInt,
    "warmup": PositiveInt,
    "matmul_size": PositiveInt,
    "baseline": bool,
    "dispatch_steps": NonNegativeInt,
}


LOGGER_SUPPLIED = ("out_dir", "run_config")  # what lmlab.factory.build_logger passes to every backend itself
SAMPLING_SETTINGS = ("num_words", "temperature", "prompt", "top_k")  # lmlab.generate's, at its top level


def validate_config(cfg: DictConfig, command: Literal["run", "bench", "evaluate", "generate"] = "run") -> None:
    """Raise :class:`ConfigError` for the first value that breaks its group's schema."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        key = missing[0]
        raise ConfigError(f"{key} must be set (the config leaves it ???); give it on the command line: {key}=VALUE")
    for key, hint in TOP_LEVEL_HINTS.items():
        if key in cfg:
            check_value(key, _plain(cfg[key]), hint)
    if cfg.get("dataset") is not None:
        dataset = _plain(cfg.dataset)
        check_arguments(
            DATASETS.lookup(dataset.get("name")), {k: v for k, v in dataset.items() if k != "name"}, "dataset"
        )
    for backend, options in (_plain(cfg.get("logger")) or {}).items():
        supplied = [key for key in options or {} if key in LOGGER_SUPPLIED]
        if supplied:
            raise ConfigError(
                f"logger.{backend}.{supplied[0]} is not a setting: lmlab hands every logger the run folder (out_dir) "
                "and the run's config (run_config); remove it"
            )
        check_arguments(LOGGERS.lookup(backend), options or {}, f"logger.{backend}")
    for group in ("device", "trainer", "optimizer"):
        node = _plain(cfg.get(group))
        if isinstance(node, dict) and "_target_" in node:
            extra = OPTIMIZER_HINTS if group == "optimizer" else None
            check_arguments(_target_of_kind(group, node["_target_"]), node, group, extra)
    hooks = (_plain(cfg.get("hooks")) or {}).items()
    for name, node in sorted(hooks, key=lambda item: item[0] != "progress"):  # others read its log_interval
        if isinstance(node, dict) and "_target_" not in node:  # keys added to a hook that is off (null)
            keys = ", ".join(f"hooks.{name}.{key}" for key in node)
            raise ConfigError(
                f"{keys} set on hooks.{name}, which is off in this config (no _target_); turn it on with the option "
                f"that brings it (hooks.lr_schedule: hooks=warmup_decay), or give hooks.{name}._target_"
            )
        if isinstance(node, dict) and "_target_" in node:
            target = get_object(node["_target_"])  # imported (plugins=[...] names a module), never called here
            if not (isinstance(target, type) and issubclass(target, Hook)):
                raise ConfigError(
                    f"hooks.{name}._target_={node['_target_']} is not a hook; it must name a subclass of "
                    "lmlab.training.hooks.Hook"
                )
            check_arguments(target, node, f"hooks.{name}")
    if cfg.get("scheduler") and OmegaConf.select(cfg, "hooks.lr_schedule"):
        raise ConfigError(
            "scheduler and hooks.lr_schedule both set the learning rate; drop one (scheduler=null keeps "
            "hooks.lr_schedule, as the recipes in conf/experiment do)"
        )
    if cfg.get("scheduler"):
        node = _plain(cfg.scheduler)
        own = {key: node[key] for key in ("interval", "warmup_steps") if key in node}  # the Schedule's, not torch's
        check_arguments(Schedule, own, "scheduler")
        target = _target_of_kind("scheduler", node["_target_"])
        check_arguments(target, {k: v for k, v in node.items() if k not in own}, "scheduler")
    if cfg.get("model") is not None:
        arguments = model_arguments(cfg.model)
        check_model_arguments(cfg.model.get("name"), arguments)
    if cfg.get("generate") is not None:
        check_arguments(sample_words, _plain(cfg.generate), "generate")
    if command == "generate":
        check_arguments(sample_words, {key: _plain(cfg[key]) for key in SAMPLING_SETTINGS if key in cfg}, "")
    if command == "evaluate":
        check_value("split", cfg.split, Literal["train", "valid", "test"])
        evaluation_method(cfg)
    if command == "run":
        test_methods(cfg)
    for key, hint in BENCH_HINTS.items():
        if cfg.get("bench") is not None and key in cfg.bench:
            check_value(f"bench.{key}", _plain(cfg.bench[key]), hint)


def _group_kinds() -> dict[str, tuple[tuple[Any, ...], str]]:
    """What a group's ``_target_`` may name: (accepted classes or the one function, in words)."""
    import torch

    from lmlab.runtime.devices import select_device
    from lmlab.training.trainer import Trainer

    schedulers = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    return {
        "optimizer": ((torch.optim.Optimizer,), "a torch.optim.Optimizer subclass (e.g. torch.optim.AdamW)"),
        "scheduler": (schedulers, "a torch LR scheduler class (e.g. torch.optim.lr_scheduler.StepLR)"),
        "trainer": ((Trainer,), "lmlab.training.trainer.Trainer or a subclass"),
        "device": ((select_device,), "lmlab.runtime.devices.select_device"),
    }


def _target_of_kind(group: str, path: str) -> Any:
    """The object ``group._target_`` names, if it is of the kind the group builds: a config passed around a lab
    cannot make a run call a plain function or builtin (``builtins.open``, ``os.system``) through it."""
    accepted, words = _group_kinds()[group]
    target = get_object(path)  # imported (a module path), never called here
    if isinstance(target, type):
        fits = any(isinstance(kind, type) and issubclass(target, kind) for kind in accepted)
    else:
        fits = any(target is kind for kind in accepted)
    if not fits:
        raise ConfigError(
            f"{group}._target_={printable(path)} is not what the {group} group builds: it must name {words}"
        )
    return target


def evaluation_method(cfg: DictConfig) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``lmlab.evaluate``'s registered method and its checked keyword arguments (its config section, if any)."""
    method = METHODS.lookup(cfg.method)
    node = cfg.get(cfg.method)
    return method, method_settings(cfg.method, _plain(node) if OmegaConf.is_dict(node) else {})


def test_methods(cfg: DictConfig) -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
    """``lmlab.run``'s ``test_with``: each named method and its checked settings (its config section).
    Every method's section is checked, named or not: a typo there is refused, not left to do nothing."""
    settings = {
        name: method_settings(name, _plain(cfg[name])) for name in sorted(METHODS) if OmegaConf.is_dict(cfg.get(name))
    }
    names = list(_plain(cfg.get("test_with")) or [])
    for name in names:
        if name == "static":
            raise ConfigError("test_with=[static]: the plain test is always reported; name other methods, e.g. [ngram]")
        if names.count(name) > 1:
            raise ConfigError(f"test_with names {name} twice; name each method once")
        if name not in METHODS:
            raise ConfigError(
                f"test_with=[{name}]: not a registered evaluation method; registered: {sorted(METHODS)} "
                "(one of your own: import the module that registers it with plugins=[module])"
            )
    return {name: (METHODS.lookup(name), settings.get(name, {})) for name in names}


def model_arguments(node: DictConfig) -> dict[str, Any]:
    """The model group as plain constructor arguments (everything but its registry ``name``)."""
    if "name" not in node:
        raise ConfigError("the model config has no 'name'; set model.name to a registered model, e.g. model.name=rnn")
    return {k: v for k, v in _plain(node).items() if k != "name"}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
