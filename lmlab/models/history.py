"""The last few words before each target, carried beside a model's features: what an n-gram of the
training text needs to score a position (:mod:`lmlab.models.ngram_mixture`, :mod:`lmlab.models.ngram_teacher`).

The words before a window's first targets were in the previous window, so the last ``history_width``
input words of each column ride in the state (-1 before a column's first word). A position's history
travels in its features, after the body's own, as floats (word ids are exact in fp32 below 2**24)::

    window inputs x_1 .. x_T (one column), state (w_-2, w_-1, w_0) for a width of 3
    history of step t's target (x_{t+1}):  x_{t-2}  x_{t-1}  x_t      (w_* where t - 2 < 1)
    features (T, B, D + 3) = [ body features (D) | x_{t-2} x_{t-1} x_t ]
"""

from __future__ import annotations

import torch

from lmlab.models.base import LanguageModel, State


class HistoryFeatures(LanguageModel):
    """Mixin: put it before a body in a class's bases and set ``history_width`` in ``__init__``; the body's
    :meth:`context_vectors` and :meth:`regularization` are handed its own part of the features, and so must
    be its ``loss``/``log_probs``/``target_log_probs`` by the mixin that builds on this one. State:
    (the body's state, the last ``history_width`` input words of each column (width, B))."""

    history_width: int

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        words = torch.full((self.history_width, batch_size), -1, dtype=torch.long, device=device)
        return (super().init_state(batch_size, device), words)

    def state_fits(self, state: State, batch_size: int) -> bool:
        if not (isinstance(state, (list, tuple)) and len(state) == 2):
            return False
        body, words = state
        fits = isinstance(words, torch.Tensor) and words.dtype == torch.long
        return fits and words.shape == (self.history_width, batch_size) and super().state_fits(body, batch_size)

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        body, past_words = state
        features, body = super().forward(tokens, body)
        steps, width = tokens.size(0), self.history_width
        words = torch.cat([past_words, tokens])  # (width + T, B)
        # the history of step t's target: the `width` words up to and including its input, words[t+1 ..]
        history = [words[i + 1 : i + 1 + steps] for i in range(width)]
        history = torch.stack(history, -1) if history else words.new_zeros(steps, tokens.size(1), 0)
        features = torch.cat([features.float(), history.float()], -1)
        return features, (body, words[words.size(0) - width :])

    def split_history(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the body's features, the history words (…, history_width), oldest first, -1 where none)."""
        body, history = features.split([features.size(-1) - self.history_width, self.history_width], -1)
        return body, history.long()

    def context_vectors(self, features: torch.Tensor) -> torch.Tensor:
        return self.body_context_vectors(self.split_history(features)[0])

    def body_context_vectors(self, body: torch.Tensor) -> torch.Tensor:
        """The body's context vectors from its own part of the features (for a mixin built on this one,
        whose ``super()`` is this class rather than the body)."""
        return super().context_vectors(body)

    def regularization(self, features: torch.Tensor) -> torch.Tensor | None:
        return super().regularization(self.split_history(features)[0])
