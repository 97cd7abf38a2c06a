"""A dataset built from a config node, or rebuilt from the record a checkpoint keeps of its run's data
(``lmlab.evaluate`` and the sweep's ensemble read a checkpoint's own data through it)."""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lmlab.config import CONF_DIR
from lmlab.config.schema import check_arguments
from lmlab.data.batching import TokenStream
from lmlab.data.corpus import Vocabulary, encode_file
from lmlab.data.datasets import DATASETS, RECORDED_TARGETS, LanguageModelData
from lmlab.errors import CheckpointError, ConfigError, printable


def build_dataset(node: Any) -> LanguageModelData:
    """The ``dataset`` group's registered dataset (``name``) built from its other keys."""
    settings = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    cls = DATASETS.lookup(settings.pop("name", None))
    return cls(**settings)


# What a checkpoint's dataset record may decide besides which registered dataset: how windows are cut
# (and a dataset class's own ``record_fields``). Never where the data is unless the class says so.
RECORD_BATCHING = {"batch_size": int, "eval_batch_size": int, "bptt": int, "variable_bptt": bool}


def dataset_from_record(record: Any, checkpoint: str) -> LanguageModelData:
    """The dataset a checkpoint's run used, rebuilt from its stored config (``config.dataset``) for
    ``lmlab.evaluate``, through the registry like a model. The record is a file lmlab is handed, so it
    chooses only a registered dataset (``name``), plain batching values (``RECORD_BATCHING``) and the
    class's ``record_fields`` (printed before use); everything else comes from the installed
    ``conf/dataset`` option of that name (WikiText's root is ``$LMLAB_DATA_DIR`` or the user's cache
    folder, its mirrors the official ones), else from the class's defaults. Nothing is cached beside
    the data."""
    record = record if isinstance(record, dict) else {}
    target = record.get("_target_")  # checkpoints from before datasets were named stored a class path
    name = record.get("name", RECORDED_TARGETS.get(target) if isinstance(target, str) else None)
    if not isinstance(name, str) or name not in DATASETS:
        shown = name if name is not None else record.get("_target_")
        raise CheckpointError(
            f"{checkpoint} names a dataset ({printable(shown)}) that lmlab does not rebuild (registered: "
            f"{sorted(DATASETS)}; a dataset of your own: plugins=[module]); or name the data, e.g. dataset=text_dir "
            "dataset.path=DIR"
        )
    cls = DATASETS[name]
    chosen = {}
    for key, kind in RECORD_BATCHING.items():
        value = record.get(key)
        if value is None:
            continue
        if type(value) is not kind or (kind is int and value < 1):
            raise CheckpointError(
                f"{checkpoint} has a damaged dataset record (dataset.{key}={printable(value)}); name the data "
                "instead, e.g. dataset=text_dir dataset.path=DIR"
            )
        chosen[key] = value
    own = {key: record[key] for key in cls.record_fields if record.get(key) is not None}
    if not all(isinstance(value, (str, int, float, bool)) for value in own.values()):
        raise CheckpointError(f"{checkpoint} has a damaged dataset record; name the data, e.g. dataset=text_dir ...")
    check_arguments(cls, own, "dataset", hydra_keys=False)
    for key, value in own.items():
        shown = f"{printable(value)}/{{train,valid,test}}.txt" if key == "path" else printable(value)
        print(f"data: {shown}, the checkpoint's own (other data: dataset=... on the command line)", flush=True)
    installed = [OmegaConf.load(f) for f in sorted(Path(CONF_DIR, "dataset").glob("*.yaml"))]
    node = next((n for n in installed if n.get("name") == name), OmegaConf.create({"name": name}))
    node.merge_with({**chosen, **own})
    if "cache" in inspect.signature(cls).parameters:
        node.merge_with({"cache": False})
    try:
        return build_dataset(node)
    except ConfigError as err:  # a value the file chose, not one typed: the command-line fix does not apply
        if not chosen or (err.key is not None and err.key.split(".")[-1] not in chosen):
            raise
        stated = ", ".join(f"dataset.{key}={printable(value)}" for key, value in chosen.items())
        raise CheckpointError(
            f"{checkpoint}'s dataset record ({stated}) does not fit its data: {err.problem}; name the data and its "
            "batching yourself, e.g. dataset=text_dir dataset.path=DIR dataset.batch_size=20"
        ) from None


class SplitStreams:
    """``streams(split, bptt=None)``: a split of ``data`` encoded with ``vocab`` (a checkpoint's words, which
    need not be the ones ``data`` counted) as evaluation windows on ``device``; what every caller that scores a
    checkpoint hands its methods (:class:`lmlab.evaluation.methods.EvaluationInputs`). ``reading_s`` adds up
    the seconds spent reading and encoding text, which are not part of a method's speed."""

    def __init__(self, data: LanguageModelData, vocab: Vocabulary, device: torch.device) -> None:
        self.data, self.vocab, self.device = data, vocab, device
        self.reading_s = 0.0

    def __call__(self, split: str, bptt: int | None = None) -> TokenStream:
        started = time.perf_counter()
        windows = self.data.eval_stream(encode_file(self.data.files[split], self.vocab), bptt).to(self.device)
        self.reading_s += time.perf_counter() - started
        return windows
