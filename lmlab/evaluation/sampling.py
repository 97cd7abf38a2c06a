"""Text in and out of a model: prompt words to ids, sampled ids back to readable text."""

from __future__ import annotations

from typing import Annotated

import torch

from lmlab.config.schema import PositiveFloat, PositiveInt, Rule
from lmlab.data.datasets import EOS, Vocabulary
from lmlab.models import LanguageModel

# More words than this is a typo (10**12 would never end); a million is a corpus-sized sample.
MAX_WORDS = 1_000_000
WordCount = Annotated[int, Rule(lambda v: 0 <= v <= MAX_WORDS, f"an integer from 0 to {MAX_WORDS:,}")]


def sample_words(
    model: LanguageModel,
    vocab: Vocabulary,
    num_words: WordCount = 15,
    temperature: PositiveFloat = 1.0,
    prompt: str = "",
    top_k: PositiveInt | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Feed ``prompt`` (or a line start), then sample ``num_words`` words; returns prompt + sample.
    The arguments after ``vocab`` are the ``generate`` config group."""
    prompt_words = prompt.split()
    ids = vocab.encode(prompt_words) if prompt_words else [vocab.eos_id]
    return prompt_words + vocab.decode(model.generate(ids, num_words, temperature, top_k, generator))


def format_words(words: list[str]) -> str:
    """Join words into text, ``<eos>`` becoming a line break."""
    return " ".join(words).replace(f" {EOS} ", "\n").replace(EOS, "\n").strip()
