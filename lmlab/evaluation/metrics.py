"""What a loss means to people: perplexity, and how it is printed."""

from __future__ import annotations

import math


def perplexity(loss: float) -> float:
    """exp(mean loss per token in nats), capped: exp overflows past ~709, and such a model is diverged anyway."""
    return math.exp(min(loss, 700.0))


def format_ppl(value: float) -> str:
    """A loss or perplexity for people: 2 decimals up to a million, then scientific (a diverged 1.01e+304)."""
    return f"{value:.2f}" if value < 1e6 else f"{value:.3g}"
