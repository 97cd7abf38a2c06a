"""The ``pointer`` head (``model.heads=[pointer]``), a pointer sentinel on top of any model: its softmax
mixed with a pointer at the words that followed its last positions.

Merity et al. 2016, "Pointer sentinel mixture models", with the keys of Grave et al.'s neural cache
(2017): at each position t the model's context vector h_t (its last layer's output) is compared with the
context vectors of the last ``pointer_window`` (L) positions before it, and points at the word that
*followed* each (a context like this one was followed by that word). A learned sentinel vector s takes
what the pointer does not want, and that share g_t is what the softmax keeps::

    q_t = tanh(W h_t + b)      z_j = q_t . h_j   (the L positions t-L .. t-1; x_{j+1} followed j)
                               z_s = q_t . s + c (the sentinel; c starts where g is ~0.9)
    [a_1 .. a_L, g_t] = softmax([z_1 .. z_L, z_s])
    p(w | context) = g_t * p_softmax(w)  +  sum of a_j over the positions j with x_{j+1} = w

So a name, a number or an ``<unk>`` that recurs in a paragraph is copied instead of having to be
predicted from the softmax's few epochs of training. The model is static: its weights are trained, then
frozen, and it conditions only on the words before the target; the window's context vectors and words
ride in the state from one BPTT window to the next (beside the body's own state: an RNN's hidden state,
a Transformer's KV cache), so a window of 35 steps still points 1,000 words back.

What ``loss``/``log_probs`` need rides in the features, concatenated on the last axis (fp32; word ids are
exact in fp32 below 2**24)::

    features (T, B, D + 2L + 1) = [ h (D) | a_1 .. a_L | g | x_{j+1} for the L positions ]

:meth:`PointerSentinel.context_vectors` hands the neural cache the h part only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmlab.config.schema import LookBack
from lmlab.models.base import LanguageModel, State
from lmlab.models.compose import context_dim_for, register_head

GATE_AT_START = 0.9  # the softmax's share before training: the pointer must earn its mass


@register_head("pointer")
class PointerSentinel(LanguageModel):
    """Head mixin (:mod:`lmlab.models.compose` puts it before a body in a class's bases): the body (every
    argument of it) + a pointer over its last ``pointer_window`` positions. The body's :meth:`forward`
    features must be its context vectors, ``context_dim`` wide, and its ``loss``/``log_probs``/
    ``target_log_probs``/``regularization`` must read them — which the mixin hands them with the pointer's
    parts split off. State: (the body's state, the last L context vectors (L, B, D), the input words at
    those positions (L, B); -1 where the column has no word yet)."""

    rank, prefix = 1, "Pointer"  # innermost: the n-gram head mixes with the pointer's distribution

    def __init__(self, vocab_size: int, pointer_window: LookBack = 100, **body_arguments) -> None:
        super().__init__(vocab_size, **body_arguments)
        self.window, self.dim = pointer_window, context_dim_for("pointer", self)
        self.query = nn.Linear(self.dim, self.dim)
        self._init_query()
        self.sentinel = nn.Parameter(torch.zeros(self.dim))
        self.sentinel_bias = nn.Parameter(torch.tensor(math.log(GATE_AT_START / (1 - GATE_AT_START) * pointer_window)))

    def _init_query(self) -> None:
        """Start the scores close to each other, so that the sentinel's bias alone sets the softmax's share
        (all equal scores would give it 1/(L+1): the bias starts it at GATE_AT_START instead). ``nn.Linear``'s
        own initialisation does that for vectors under 1, as an RNN's outputs are. Normalised vectors
        (a LayerNorm's: ~1 per feature, |h|^2 ~ D) would spread its scores over ~±7 and hand the pointer a
        random share; a query of std 0.1/D spreads them over ~0.1."""
        if self.context_vectors_normalised:
            nn.init.normal_(self.query.weight, std=0.1 / self.dim)
            nn.init.zeros_(self.query.bias)

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        outputs = torch.zeros(self.window, batch_size, self.dim, device=device)
        words = torch.full((self.window, batch_size), -1, dtype=torch.long, device=device)
        return (super().init_state(batch_size, device), outputs, words)

    def state_fits(self, state: State, batch_size: int) -> bool:
        if not (isinstance(state, (list, tuple)) and len(state) == 3):
            return False
        body, outputs, words = state
        window = (
            isinstance(outputs, torch.Tensor)
            and outputs.is_floating_point()
            and outputs.shape == (self.window, batch_size, self.dim)
            and isinstance(words, torch.Tensor)
            and words.dtype == torch.long
            and words.shape == (self.window, batch_size)
        )
        return window and super().state_fits(body, batch_size)

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        body, past_outputs, past_words = state
        h, body = super().forward(tokens, body)
        steps, batch, window = tokens.size(0), tokens.size(1), self.window
        outputs = torch.cat([past_outputs.to(h.dtype), h])  # (L + T, B, D): position L + t is step t
        words = torch.cat([past_words, tokens])  # (L + T, B)
        query = torch.tanh(self.query(h))
        scores = torch.einsum("tbd,jbd->tbj", query, outputs)  # (T, B, L + T)
        # Step t compares itself with the L positions before it (t .. t + L - 1 here) and points at the
        # word that followed each (t + 1 .. t + L: at most its own input, never its target).
        before = torch.arange(steps, device=h.device).view(steps, 1, 1) + torch.arange(window, device=h.device)
        before = before.expand(steps, batch, window)
        scores = scores.gather(2, before)
        columns = words.t().unsqueeze(0).expand(steps, batch, -1)
        scores = scores.masked_fill(columns.gather(2, before) < 0, float("-inf"))  # no word there yet
        followed_by = columns.gather(2, before + 1)  # (T, B, L)
        sentinel = (query * self.sentinel.to(query.dtype)).sum(-1, keepdim=True) + self.sentinel_bias
        attention = torch.softmax(torch.cat([scores, sentinel], -1).float(), -1)  # (T, B, L + 1)
        features = torch.cat([h.float(), attention, followed_by.clamp_min(0).float()], -1)
        return features, (body, outputs[-window:], words[-window:])

    def _parts(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h, pointer weights a (…, L), softmax share g (…, 1), word ids (…, L))."""
        h, attention, words = features.split([self.dim, self.window + 1, self.window], -1)
        return h, attention[..., : self.window], attention[..., self.window :], words.long()

    def context_vectors(self, features: torch.Tensor) -> torch.Tensor:
        return self._parts(features)[0]

    def regularization(self, features: torch.Tensor) -> torch.Tensor | None:
        return super().regularization(self._parts(features)[0])

    def target_log_probs(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h, pointer, gate, words = self._parts(features)
        from_softmax = gate.squeeze(-1) * super().target_log_probs(h, targets).exp()
        from_pointer = (pointer * (words == targets.unsqueeze(-1))).sum(-1)
        return (from_softmax + from_pointer).clamp_min(1e-30).log()

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -self.target_log_probs(features, targets).mean()

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        h, pointer, gate, words = self._parts(features)
        probs = (super().log_probs(h).float().exp() * gate).scatter_add(-1, words, pointer)
        return probs.clamp_min(1e-30).log()

    def flops_per_token(self, train_tokens: torch.Tensor | None = None) -> dict[str, float] | None:
        parts = super().flops_per_token(train_tokens)
        if parts is None:
            return None
        parts["pointer"] = 2.0 * self.dim * (self.dim + self.window + 1)  # query, scores, sentinel
        parts["forward"] += parts["pointer"]
        return parts
