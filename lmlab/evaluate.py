"""``python -m lmlab.evaluate checkpoint=PATH [split=test] [dataset=... trainer.limit_eval_batches=N]``.

Reports loss and perplexity of a saved model on one split, encoding the text with the checkpoint's own
vocabulary (so a checkpoint can be scored on any corpus; unseen words count as ``<unk>``). The data is
the run's own (from the checkpoint's stored config) unless any ``dataset`` key is given.
"""

from __future__ import annotations

import json
import math

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lmlab.checkpoint import model_from_checkpoint
from lmlab.cli import CONF_DIR
from lmlab.config import validate_config
from lmlab.data import SPLITS, dataset_from_record, read_text, tokenize
from lmlab.errors import ConfigError
from lmlab.factory import build, import_plugins, require_checkpoint
from lmlab.jobs import task_wrapper


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate_cli")
@task_wrapper
def main(cfg: DictConfig) -> dict[str, float]:
    import_plugins(cfg.get("plugins"))
    validate_config(cfg)
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r} is unknown; choose one of {SPLITS}")
    device = build(cfg.device)
    model, vocab, state = model_from_checkpoint(require_checkpoint(cfg), device)
    overridden = any(o.lstrip("+~").startswith("dataset") for o in HydraConfig.get().overrides.task)
    record = (state.get("config") or {}).get("dataset")
    data = build(cfg.dataset) if overridden or record is None else dataset_from_record(record)
    tokens = tokenize(read_text(data.files[cfg.split]), vocab)
    loss = build(cfg.trainer).evaluate(model, data.eval_stream(tokens).to(device), device)
    result = {"split": cfg.split, "loss": loss, "ppl": math.exp(loss), "tokens": len(tokens)}
    print(f"{cfg.split}-loss: {loss:.2f} | {cfg.split}-pp: {math.exp(loss):.2f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
