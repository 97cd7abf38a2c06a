"""The ``ngram`` head (``model.heads=[ngram]``): a Kneser-Ney n-gram of the training text inside a model,
mixed with it by a learned gate and trained beside it (Neubig & Dyer 2016, "Generalizing and hybridizing
count-based and neural language models").

At each position t the body (any :class:`~lmlab.models.base.LanguageModel`: an RNN, a Transformer, either
with a pointer) gives p_body; the counts give p_ngram from the last ``ngram_order`` - 1 words; a gate
that reads the body's context vector h_t and how long a context the counts have seen (m_t) decides::

    g_t = sigmoid(u . h_t/|h_t| + b[m_t])    m_t = 0 .. order-1 words of history seen as a context
    p(w | context) = (1 - g_t) p_body(w | context) + g_t p_ngram(w | last order-1 words)

so the network learns where the counts are better (a phrase seen many times) and spends itself on the
rest. The counts are of the training split only (:meth:`take_corpus`: the runner hands them over before
training), and they ride in the model's state dict as the word ids they come from, so a checkpoint
carries its n-gram and scores any text with it. While training, each training position is scored by the
counts with its own occurrence left out (:meth:`KneserNey.score`'s ``leave_one_out``): counts that
include the word being predicted would teach the gate to trust them far more than they deserve on text
they have not seen. At evaluation the counts are all there. The model stays static: its weights and counts
are fixed once trained, and it conditions only on the words before the target.

Measured (experiments/transformer.md): this ties at best with the same counts mixed in after training with
one share picked on the validation split (``test_with=[ngram]``): the gate learns on training text, where the
network is better than it will be on new text, so it gives the counts too small a share.

State: (the body's state, the last order-1 input words of each column (order-1, B); -1 before its first).
Features: ``[ body features | the order-1 history words of each position (as floats: ids < 2**24) ]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import PositiveInt, UnitInterval
from lmlab.data.kneser_ney import KneserNey, check_history, check_order
from lmlab.errors import CheckpointError
from lmlab.models.base import LanguageModel, State
from lmlab.models.compose import context_dim_for, register_head

GATE_AT_START = 0.1  # the counts' share before training: below a static mixture's; the gate learns the rest


@register_head("ngram")
class NgramMixture(LanguageModel):
    """Head mixin (:mod:`lmlab.models.compose` puts it before a body, or a body with a pointer, in a class's
    bases): the model beneath + an ``ngram_order`` Kneser-Ney model of its training text, mixed by a gate. The
    body's ``loss``/``log_probs``/``target_log_probs``/``context_vectors``/``regularization`` are handed
    its own part of the features.

    ``ngram_coupling`` (0 .. 1): how much of the body's gradient comes from the mixture's likelihood rather
    than its own; the gate always learns from the mixture, and the loss is always the mixture's. At 1 the
    body may specialise in what the counts miss, and may also stop learning (a gate that hands the counts
    everything early leaves it no gradient); at 0 it trains as it would alone."""

    rank, prefix = 2, "Ngram"  # outermost: mixes with whatever distribution the model beneath gives

    def __init__(
        self, vocab_size: int, ngram_order: PositiveInt = 4, ngram_coupling: UnitInterval = 0.0, **body_arguments
    ) -> None:
        check_history(ngram_order, "model.ngram_order")
        check_order(ngram_order, vocab_size, "model.ngram_order")  # before any text is counted
        super().__init__(vocab_size, **body_arguments)
        self.ngram_order, self.ngram_width, self.ngram_coupling = ngram_order, ngram_order - 1, ngram_coupling
        self.ngram_gate = nn.Linear(context_dim_for("ngram", self), 1, bias=False)  # the bias: by matched length
        nn.init.zeros_(self.ngram_gate.weight)
        start = math.log(GATE_AT_START / (1 - GATE_AT_START))
        self.ngram_gate_bias = nn.Parameter(torch.full((ngram_order,), start))  # by matched context length
        # No text yet: the counts of an empty text (every word 1/V) until take_corpus or a checkpoint.
        self._text = torch.zeros(0, dtype=torch.int32, device="cpu")
        self._counts: KneserNey | None = None

    # ------------------------------------------------------------------------------- the counts
    def take_corpus(self, train_tokens: torch.Tensor) -> None:
        """:class:`~lmlab.models.base.ReadsTrainingText`: count the training split's n-grams (they are kept in
        the state dict from here on)."""
        self._set_text(train_tokens.detach().to("cpu").flatten(), "the training split")

    @property
    def counts(self) -> KneserNey:
        if self._counts is None:
            self._counts = KneserNey(self._text.long(), self.vocab_size, self.ngram_order)
        return self._counts

    def get_extra_state(self) -> torch.Tensor:
        return self._text

    def set_extra_state(self, state: object) -> None:
        if not (isinstance(state, torch.Tensor) and state.dim() == 1 and state.dtype == torch.int32):
            raise CheckpointError("its n-gram's text (_extra_state) is not the 1-D int32 word ids lmlab writes")
        if state.is_meta:
            return
        if not state.numel():  # counts of no text score every word 1/V: a model that never got its text
            raise CheckpointError("its n-gram's text (_extra_state) is empty: the counts were never taken")
        self._set_text(state.cpu(), "its n-gram's text (_extra_state)")

    def _set_text(self, tokens: torch.Tensor, what: str) -> None:
        outside = tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < self.vocab_size
        if tokens.is_floating_point() or outside:
            raise CheckpointError(f"{what} holds ids outside the vocabulary of {self.vocab_size:,} words")
        self._text, self._counts = tokens.to(torch.int32).clone(), None

    # ------------------------------------------------------------------------------- the model
    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        words = torch.full((self.ngram_width, batch_size), -1, dtype=torch.long, device=device)
        return (super().init_state(batch_size, device), words)

    def state_fits(self, state: State, batch_size: int) -> bool:
        if not (isinstance(state, (list, tuple)) and len(state) == 2):
            return False
        body, words = state
        fits = isinstance(words, torch.Tensor) and words.dtype == torch.long
        return fits and words.shape == (self.ngram_width, batch_size) and super().state_fits(body, batch_size)

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        body, past_words = state
        features, body = super().forward(tokens, body)
        steps, words = tokens.size(0), torch.cat([past_words, tokens])  # (order-1 + T, B)
        # the history of step t's target: the order-1 words up to and including its input, words[t+1 ..]
        history = [words[i + 1 : i + 1 + steps] for i in range(self.ngram_width)]
        history = torch.stack(history, -1) if history else words.new_zeros(steps, tokens.size(1), 0)
        features = torch.cat([features.float(), history.float()], -1)
        return features, (body, words[words.size(0) - self.ngram_width :])

    def _ngram_parts(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the body's features, the history words (…, order-1))."""
        body, history = features.split([features.size(-1) - self.ngram_width, self.ngram_width], -1)
        return body, history.long()

    def _log_gates(self, body: torch.Tensor, matched: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log(1 - g), log g) per position. The gate reads the direction of h, detached: it learns where to
        trust the counts without pulling h towards saying so (which cost the body much of its perplexity:
        experiments/transformer.md), and its gradient stays of the size of one vector per token
        whatever the body's scale (a Transformer's h is ~sqrt(D) long), so it does not eat the step's share
        under gradient clipping."""
        direction = F.normalize(super().context_vectors(body).detach().float(), dim=-1)
        logit = self.ngram_gate(direction).squeeze(-1) + self.ngram_gate_bias[matched]
        return F.logsigmoid(-logit), F.logsigmoid(logit)

    def target_log_probs(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        body, history = self._ngram_parts(features)
        from_body = super().target_log_probs(body, targets)
        # While training, the positions are the counted text's own: each without itself.
        p, matched = self.counts.score(history.reshape(-1, self.ngram_width), targets.reshape(-1), self.training)
        keep, take = self._log_gates(body, matched.to(targets.device).view(targets.shape))
        from_counts = p.to(targets.device, torch.float32).view(targets.shape).log()
        mixed = torch.logaddexp(keep + from_body, take + from_counts)
        if not (self.training and torch.is_grad_enabled()) or self.ngram_coupling == 1:
            return mixed
        # The same value, but the body learns (1 - coupling) from its own likelihood: fully coupled, a gate
        # that learns early that the counts beat an untrained body hands them everything, and the body,
        # whose gradient the gate scales by its share, stops learning (experiments/transformer.md).
        gate_only = torch.logaddexp(keep + from_body.detach(), take + from_counts)
        alone = from_body - from_body.detach()  # 0, with the body's own gradient
        return self.ngram_coupling * mixed + (1 - self.ngram_coupling) * (gate_only + alone)

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -self.target_log_probs(features, targets).mean()

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        body, history = self._ngram_parts(features)
        from_body = super().log_probs(body).float()
        p, matched = self.counts.distribution(history.reshape(-1, self.ngram_width))
        keep, take = self._log_gates(body, matched.to(body.device).view(body.shape[:-1]))
        from_counts = p.to(body.device, torch.float32).view(from_body.shape).log()
        return torch.logaddexp(keep.unsqueeze(-1) + from_body, take.unsqueeze(-1) + from_counts)

    def context_vectors(self, features: torch.Tensor) -> torch.Tensor:
        return super().context_vectors(self._ngram_parts(features)[0])

    def regularization(self, features: torch.Tensor) -> torch.Tensor | None:
        return super().regularization(self._ngram_parts(features)[0])

    @property
    def static_shapes(self) -> bool:
        return False  # the counts are looked up on the host, by the data

    def flops_per_token(self, train_tokens: torch.Tensor | None = None) -> dict[str, float] | None:
        parts = super().flops_per_token(train_tokens)
        if parts is None:
            return None
        parts["gate"] = 2.0 * self.context_dim
        parts["forward"] += parts["gate"]
        return parts
