"""Sample text from a trained model, and the ``python -m lmlab.generate`` entry point.

    python -m lmlab.generate checkpoint=PATH num_words=50 temperature=0.8 prompt="The game"

Needs only the checkpoint: it carries the vocabulary and the model config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from lmlab.checkpoint import load_checkpoint
from lmlab.cli import CONF_DIR, build, exit_on_lmlab_error
from lmlab.data import EOS, Vocabulary
from lmlab.errors import CheckpointError, ConfigError
from lmlab.models import RNNLanguageModel, detach_hidden


def model_from_checkpoint(
    path: str | Path, device: torch.device
) -> tuple[RNNLanguageModel, Vocabulary, dict[str, Any]]:
    """Rebuild the model and vocabulary saved in a checkpoint, ready for inference."""
    state = load_checkpoint(path)
    vocab = Vocabulary(state["vocab"])
    model = build(state["model_config"], vocab_size=len(vocab))
    try:
        model.load_state_dict(state["model_state"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{path} does not fit its own model config/vocabulary: {str(err).splitlines()[-1].strip()}"
        ) from err
    return model.to(device).eval(), vocab, state


@torch.inference_mode()
def generate_words(
    model: RNNLanguageModel,
    vocab: Vocabulary,
    num_words: int,
    temperature: float = 1.0,
    prompt: str = "",
    top_k: int | None = None,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> list[str]:
    """Feed ``prompt`` (or a line start), then sample ``num_words`` words; returns prompt + sample."""
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature} must be > 0 (lower is more conservative)")
    if num_words < 0:
        raise ConfigError(f"num_words={num_words} must be >= 0")
    model.eval()
    prompt_words = prompt.split()
    ids = vocab.encode(prompt_words) if prompt_words else [vocab.eos_id]
    hidden = model.init_hidden(1, device)
    features, hidden = model(torch.tensor(ids, device=device).view(-1, 1), hidden)
    words: list[str] = []
    for _ in range(num_words):
        logits = model.log_probs(features[-1, 0]) / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        next_id = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)
        words.append(vocab.words[int(next_id)])
        features, hidden = model(next_id.view(1, 1), detach_hidden(hidden))
    return prompt_words + words


def format_words(words: list[str]) -> str:
    """Join words into text, ``<eos>`` becoming a line break."""
    return " ".join(words).replace(f" {EOS} ", "\n").replace(EOS, "\n").strip()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate_cli")
@exit_on_lmlab_error
def main(cfg: DictConfig) -> None:
    device = build(cfg.device)
    model, vocab, _ = model_from_checkpoint(cfg.checkpoint, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    words = generate_words(
        model, vocab, cfg.num_words, cfg.temperature, str(cfg.prompt or ""), cfg.top_k, device, generator
    )
    print(format_words(words))


if __name__ == "__main__":
    main()
