"""``python -m lmlab.evaluate checkpoint=PATH [method=static|cache|dynamic] [split=test]``.

Reports loss, perplexity and tokens/s of a saved model on one split, encoding the text with the
checkpoint's own vocabulary (so a checkpoint can be scored on any corpus; unseen words count as
``<unk>``). The data is the run's own unless any ``dataset`` key is given; the checkpoint's stored
config then decides only which registered dataset and how it is batched, never where the data is
(:func:`lmlab.factory.dataset_from_record`). ``method=cache`` mixes in a neural cache
(``cache.search=true`` picks theta/lambda on the validation split first); ``method=dynamic`` adapts a
copy of the model to the text as it reads it (see :mod:`lmlab.evaluation.methods`). One JSON line is printed
and written to ``output`` (default: beside the checkpoint, ``best.<method>.<split>.json``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lmlab.config import CONF_DIR
from lmlab.config.schema import NonNegativeFloat, PositiveFloat, PositiveInt, Probability, UnitInterval, check_value
from lmlab.config.validation import validate_config
from lmlab.data.corpus import encode_file
from lmlab.evaluation.methods import CACHE_THETAS, cache_scores, dynamic_loss, gradient_rms, search_cache
from lmlab.factory import build, build_dataset, dataset_from_record, import_plugins, require_checkpoint
from lmlab.loggers.base import perplexity
from lmlab.runtime.files import atomic_write_text
from lmlab.runtime.records import task_wrapper
from lmlab.training.checkpoint import model_from_checkpoint

METHOD_HINTS = {
    "cache": {"size": PositiveInt, "theta": PositiveFloat, "lambda": UnitInterval, "search": bool},
    "dynamic": {"lr": NonNegativeFloat, "decay": Probability, "bptt": PositiveInt, "stat_batches": PositiveInt},
}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate_cli")
@task_wrapper
def main(cfg: DictConfig) -> dict[str, Any]:
    checkpoint = require_checkpoint(cfg)
    import_plugins(cfg.get("plugins"))
    validate_config(cfg)
    settings = _method_settings(cfg)
    device = build(cfg.device)
    model, vocab, state = model_from_checkpoint(checkpoint, device)
    overridden = any(o.lstrip("+~").startswith("dataset") for o in HydraConfig.get().overrides.task)
    config = state.get("config")
    record = config.get("dataset") if isinstance(config, dict) else None
    data = build_dataset(cfg.dataset) if overridden or record is None else dataset_from_record(record, checkpoint)

    def stream(split: str, bptt: int | None = None):
        return data.eval_stream(encode_file(data.files[split], vocab), bptt).to(device)

    limit = cfg.trainer.limit_eval_batches
    target = stream(cfg.split, settings.get("bptt"))
    if cfg.method == "cache" and settings["search"]:
        searching = time.perf_counter()
        best, settings["theta"], settings["lambda"] = search_cache(
            cache_scores(model, stream("valid"), settings["size"], CACHE_THETAS, limit)
        )
        settings.update(valid_ppl=perplexity(best), search_seconds=time.perf_counter() - searching)
    started = time.perf_counter()  # the evaluation of the split itself (a search is timed apart)
    if cfg.method == "static":
        loss = build(cfg.trainer).evaluate(model, target, device)  # limit: trainer.limit_eval_batches
    elif cfg.method == "cache":
        scores = cache_scores(model, target, settings["size"], [settings["theta"]], limit)
        loss = scores.loss(settings["theta"], settings["lambda"])
    else:
        rms = gradient_rms(model, stream("train", settings["bptt"]), settings["stat_batches"])
        loss = dynamic_loss(model, target, rms, settings["lr"], settings["decay"], limit)
    seconds = time.perf_counter() - started
    tokens = sum(w.targets.numel() for w in target.windows(limit=limit))
    result = {
        "method": cfg.method, "split": cfg.split, "loss": loss, "ppl": perplexity(loss), "tokens": tokens,
        "tokens_per_sec": tokens / seconds, "seconds": seconds, "settings": settings, "checkpoint": checkpoint,
    }  # fmt: skip
    line = json.dumps(result)
    print(f"{cfg.split}-loss: {loss:.2f} | {cfg.split}-pp: {perplexity(loss):.2f} ({cfg.method})")
    print(line)
    output = Path(cfg.output or Path(checkpoint).with_name(f"{Path(checkpoint).stem}.{cfg.method}.{cfg.split}.json"))
    try:
        atomic_write_text(output, line + "\n")
    except OSError as err:  # e.g. a read-only checkpoint folder: the printed line is the result
        print(f"warning: could not write {output} ({err.strerror or err}); set output=PATH", file=sys.stderr)
    return result


def _method_settings(cfg: DictConfig) -> dict[str, Any]:
    """The chosen method's settings, checked (one line per bad value) before anything is loaded."""
    check_value("method", cfg.method, Literal["static", "cache", "dynamic"])
    check_value("split", cfg.split, Literal["train", "valid", "test"])
    if cfg.method == "static":
        return {}
    settings = OmegaConf.to_container(cfg[cfg.method], resolve=True)
    for key, hint in METHOD_HINTS[cfg.method].items():
        check_value(f"{cfg.method}.{key}", settings.get(key), hint)
    return settings


if __name__ == "__main__":
    main()
