"""What a loss means to people: perplexity, and how it is printed."""

from __future__ import annotations

import math


def perplexity(loss: float) -> float:
    """exp(mean loss per token in nats), capped: exp overflows past ~709, and such a model is diverged anyway."""
    return math.exp(min(loss, 700.0))


def no_better_than_uniform(loss: float, vocab_size: int) -> bool:
    """A loss per token at or above ln(vocabulary): what guessing every word with the same probability
    costs. A model there has learned nothing (not even which words are common); not finite counts too."""
    return not loss < math.log(max(vocab_size, 2))


def uniform_guess_warning(loss: float, vocab_size: int, when: str, lr: float | None = None) -> str:
    """The one line that says a run learned nothing, with the usual cause and fix."""
    fix = f" (now {lr:g})" if lr is not None else ""
    return (
        f"warning: validation perplexity {format_ppl(perplexity(loss))} {when} is no better than a uniform guess "
        f"over the {vocab_size:,}-word vocabulary: the model learned nothing. The usual cause is a learning rate "
        f"too high for this model: lower optimizer.lr{fix}, or use the optimizer its model option brings"
    )


def format_ppl(value: float) -> str:
    """A loss or perplexity for people: 2 decimals up to a million, then scientific (a diverged 1.01e+304)."""
    return f"{value:.2f}" if value < 1e6 else f"{value:.3g}"
