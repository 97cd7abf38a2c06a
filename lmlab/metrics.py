"""What a loss means to people: perplexity, and how it is printed."""

from __future__ import annotations

import math


def perplexity(loss: float) -> float:
    """exp(mean loss per token in nats), capped: exp overflows past ~709, and such a model is diverged anyway."""
    return math.exp(min(loss, 700.0))


# How far below a uniform guess (ln V nats per token) validation must be for a run to count as having learned: half a
# nat, a perplexity under V / 1.65. A model that learns at all gets there within steps (the word frequencies alone are
# worth ~2.7 nats on WikiText); one at V / 1.01 has not.
LEARNED_MARGIN = 0.5


def no_better_than_uniform(loss: float, vocab_size: int) -> bool:
    """A loss per token not clearly below ln(vocabulary) (by :data:`LEARNED_MARGIN`): what guessing every word with
    the same probability costs. A model there has learned nothing (not even which words are common); not finite
    counts too."""
    return not loss < math.log(max(vocab_size, 2)) - LEARNED_MARGIN


def uniform_guess_warning(loss: float, vocab_size: int, when: str, lr: float | None = None) -> str:
    """The one line that says a run learned nothing, with the usual cause and fix."""
    fix = f" (now {lr:g})" if lr is not None else ""
    bound = math.exp(math.log(max(vocab_size, 2)) - LEARNED_MARGIN)
    return (
        f"warning: validation perplexity {format_ppl(perplexity(loss))} {when} is no better than a uniform guess "
        f"over the {vocab_size:,}-word vocabulary (a model that learns is soon below {bound:,.0f}): the model learned "
        f"nothing. The usual cause is a learning rate too high for this model: lower optimizer.lr{fix}, or use the "
        "optimizer its model option brings"
    )


def format_ppl(value: float) -> str:
    """A loss or perplexity for people: 2 decimals up to a million, then scientific (a diverged 1.01e+304)."""
    return f"{value:.2f}" if value < 1e6 else f"{value:.3g}"
