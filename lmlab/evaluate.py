"""``python -m lmlab.evaluate checkpoint=PATH [split=test] [dataset=... trainer.limit_eval_batches=N]``.

Reports loss and perplexity of a saved model on one split, encoding the text with the checkpoint's own
vocabulary (so a checkpoint can be scored on any corpus; unseen words count as ``<unk>``).
"""

from __future__ import annotations

import json
import math

import hydra
from omegaconf import DictConfig

from lmlab.cli import CONF_DIR, build, exit_on_lmlab_error
from lmlab.data import SPLITS, batchify, read_text, tokenize
from lmlab.errors import ConfigError
from lmlab.generate import model_from_checkpoint


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate_cli")
@exit_on_lmlab_error
def main(cfg: DictConfig) -> dict[str, float]:
    if cfg.split not in SPLITS:
        raise ConfigError(f"split={cfg.split!r} is unknown; choose one of {SPLITS}")
    device = build(cfg.device)
    model, vocab, _ = model_from_checkpoint(cfg.checkpoint, device)
    data = build(cfg.dataset)
    tokens = tokenize(read_text(data.files[cfg.split]), vocab)
    columns = batchify(tokens, data.eval_batch_size).to(device)
    loss = build(cfg.trainer).evaluate(model, columns, data.bptt, device)
    result = {"split": cfg.split, "loss": loss, "ppl": math.exp(loss), "tokens": len(tokens)}
    print(f"{cfg.split}-loss: {loss:.2f} | {cfg.split}-pp: {math.exp(loss):.2f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
