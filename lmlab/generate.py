"""``python -m lmlab.generate checkpoint=PATH num_words=50 temperature=0.8 prompt="The game"``.

Needs only the checkpoint: it carries the vocabulary and the model (registry name and arguments).
A model of your own: add ``plugins=[module]`` so that its registration is imported.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import lmlab.runtime.cpu_load  # noqa: F401  (first of lmlab: its sample of the machine's load starts now)
from lmlab.config import CONF_DIR
from lmlab.config.help import answer_help
from lmlab.runtime.job_records import task_wrapper

USAGE = 'python -m lmlab.generate checkpoint=PATH [num_words=50] [temperature=0.8] [prompt="The game"] [seed=1]'


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
@task_wrapper
def generate(cfg: DictConfig) -> str:
    import torch  # here: --help and a refused argument answer before torch is loaded

    from lmlab.evaluation.sampling import format_words, sample_words
    from lmlab.factory import GENERATE_KEYS, build, import_plugins, refuse_unread_keys, require_checkpoint
    from lmlab.training.checkpoint_format import model_from_checkpoint
    from lmlab.validation import SAMPLING_SETTINGS, validate_config

    checkpoint = require_checkpoint(cfg)
    import_plugins(cfg.get("plugins"))
    refuse_unread_keys(cfg, GENERATE_KEYS)
    validate_config(cfg, "generate")
    settings = {key: cfg[key] for key in SAMPLING_SETTINGS}
    device = build(cfg.device)
    model, vocab, _ = model_from_checkpoint(checkpoint, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    text = format_words(sample_words(model, vocab, **settings, generator=generator))
    print(text)
    return text


def main() -> None:
    answer_help("lmlab.generate", "generate", USAGE)
    generate()


if __name__ == "__main__":
    main()
