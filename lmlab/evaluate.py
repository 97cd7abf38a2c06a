"""``python -m lmlab.evaluate checkpoint=PATH [method=static|cache|dynamic] [split=test]``.

Reports loss, perplexity and tokens/s of a saved model on one split, encoding the text with the
checkpoint's own vocabulary (so a checkpoint can be scored on any corpus; unseen words count as
``<unk>``). The data is the run's own unless any ``dataset`` key is given; the checkpoint's stored
config then decides only which registered dataset and how it is batched, never where the data is
(:func:`lmlab.data.rebuild.dataset_from_record`). ``method=cache`` mixes in a neural cache
(``cache.search=true`` picks theta/lambda on the validation split first); ``method=dynamic`` adapts a
copy of the model to the text as it reads it; a method of your own registers itself
(:mod:`lmlab.evaluation.methods`) and is named with ``plugins=[module] method=<name>``. One JSON line is printed
and written to ``output`` (default: beside the checkpoint, ``best.<method>.<split>.json``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import lmlab.runtime.cpu_load  # noqa: F401  (first of lmlab: its sample of the machine's load starts now)
from lmlab.config import CONF_DIR
from lmlab.config.help import answer_help
from lmlab.errors import ConfigError
from lmlab.runtime.files import atomic_write_text
from lmlab.runtime.job_records import task_wrapper

USAGE = (
    "python -m lmlab.evaluate checkpoint=PATH [method=static|ngram|cache|dynamic|ensemble] [split=test] [dataset=...]"
)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    # here: --help and a refused argument answer before torch is loaded
    from lmlab.data.rebuild import SplitStreams, build_dataset, dataset_from_record
    from lmlab.evaluation.methods import EvaluationInputs, check_before_work
    from lmlab.factory import EVALUATE_KEYS, build, import_plugins, refuse_unread_keys, require_checkpoint
    from lmlab.metrics import perplexity
    from lmlab.training.checkpoint_format import model_from_checkpoint
    from lmlab.validation import evaluation_method, validate_config

    checkpoint = require_checkpoint(cfg)
    import_plugins(cfg.get("plugins"))
    refuse_unread_keys(cfg, EVALUATE_KEYS)
    validate_config(cfg, "evaluate")
    method, settings = evaluation_method(cfg)
    device = build(cfg.device)
    model, vocab, state = model_from_checkpoint(checkpoint, device)
    check_before_work(cfg.method, settings, vocab)
    for member in settings.get("members", []) if cfg.method == "ensemble" else []:
        if Path(member).is_file() and os.path.samefile(member, checkpoint):
            raise ConfigError(f"ensemble.members names {member}, the checkpoint being evaluated; name the other models")
    overridden = any(o.lstrip("+~").startswith("dataset") for o in HydraConfig.get().overrides.task)
    config = state.get("config")
    record = config.get("dataset") if isinstance(config, dict) else None
    data = build_dataset(cfg.dataset) if overridden or record is None else dataset_from_record(record, checkpoint)
    trainer = build(cfg.trainer)  # limit: trainer.limit_eval_batches

    stream = SplitStreams(data, vocab, device)

    limit = cfg.trainer.limit_eval_batches
    static = lambda s: trainer.evaluate(model, s, device, label=cfg.split)  # noqa: E731
    inputs = EvaluationInputs(model, cfg.split, stream, static, limit, vocab, trainer.autocast_dtype(device))
    started = time.perf_counter()
    scored = method(inputs, **settings)
    # the scored split's own time: without reading text and without a settings search
    seconds = time.perf_counter() - started - stream.reading_s - scored.settings.get("search_seconds", 0.0)
    loss, tokens = scored.loss, sum(w.targets.numel() for w in scored.stream.windows(limit=limit))
    result = {
        "method": cfg.method,
        "split": cfg.split,
        "loss": loss,
        "ppl": perplexity(loss),
        "tokens": tokens,
        "tokens_per_sec": tokens / seconds,
        "seconds": seconds,
        "settings": scored.settings,
        "checkpoint": checkpoint,
    }
    line = json.dumps(result)
    print(f"{cfg.split}-loss: {loss:.2f} | {cfg.split}-pp: {perplexity(loss):.2f} ({cfg.method})")
    print(line)
    output = Path(cfg.output or Path(checkpoint).with_name(f"{Path(checkpoint).stem}.{cfg.method}.{cfg.split}.json"))
    try:
        atomic_write_text(output, line + "\n")
    except OSError as err:  # e.g. a read-only checkpoint folder: the printed line is the result
        print(f"warning: could not write {output} ({err.strerror or err}); set output=PATH", file=sys.stderr)
    return result


def main() -> None:
    answer_help("lmlab.evaluate", "evaluate", USAGE)
    evaluate()


if __name__ == "__main__":
    main()
