"""Recurrent word-level language models (LSTM or GRU), one ``nn.Module`` for both cells.

Layers are separate single-layer RNNs so that each keeps PyTorch's fused kernel while the last layer
can be sized to the embedding (weight tying with hidden_dim != embed_dim, as in AWD-LSTM) and dropout
sits between layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError

LayerState = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
Hidden = list[LayerState]
RNN_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class RNNLanguageModel(nn.Module):
    """Embedding → stacked LSTM/GRU → (tied) softmax over the vocabulary.

    ``softmax="adaptive"`` replaces the full output layer by ``nn.AdaptiveLogSoftmaxWithLoss``
    (vocabulary ids must be sorted by frequency, as lmlab's are), which cannot be tied.
    """

    def __init__(
        self,
        vocab_size: int,
        cell: str = "lstm",
        embed_dim: int = 650,
        hidden_dim: int = 650,
        num_layers: int = 2,
        dropout: float = 0.5,
        tie_weights: bool = True,
        softmax: str = "full",
        adaptive_cutoffs: list[int] | tuple[int, ...] = (2000, 10000),
    ) -> None:
        super().__init__()
        _check_args(vocab_size, cell, embed_dim, hidden_dim, num_layers, dropout, tie_weights, softmax)
        self.cell, self.vocab_size = cell, vocab_size
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        out_dim = embed_dim if tie_weights else hidden_dim
        sizes = [embed_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.rnns = nn.ModuleList(RNN_CELLS[cell](sizes[i], sizes[i + 1]) for i in range(num_layers))
        self.drop = nn.Dropout(dropout)
        if softmax == "adaptive":
            cutoffs = [c for c in adaptive_cutoffs if c < vocab_size - 1]
            self.decoder = None
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(out_dim, vocab_size, cutoffs, div_value=4.0)
        else:
            self.adaptive = None
            self.decoder = nn.Linear(out_dim, vocab_size)
            if tie_weights:
                self.decoder.weight = self.embedding.weight
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if self.decoder is not None:
            nn.init.zeros_(self.decoder.bias)
            if self.decoder.weight is not self.embedding.weight:
                nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def init_hidden(self, batch_size: int, device: torch.device | str = "cpu") -> Hidden:
        hidden: Hidden = []
        for rnn in self.rnns:
            zeros = torch.zeros(1, batch_size, rnn.hidden_size, device=device)
            hidden.append((zeros, zeros.clone()) if self.cell == "lstm" else zeros)
        return hidden

    def forward(self, tokens: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """tokens (T, B) → features (T, B, out_dim) for :meth:`loss` / :meth:`log_probs`, new hidden."""
        x = self.drop(self.embedding(tokens))
        new_hidden: Hidden = []
        for i, rnn in enumerate(self.rnns):
            x, state = rnn(x, hidden[i])
            new_hidden.append(state)
            x = self.drop(x)
        return x, new_hidden

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats per token) of ``targets`` given ``features``."""
        flat = features.reshape(-1, features.size(-1))
        if self.adaptive is not None:
            return self.adaptive(flat, targets.reshape(-1)).loss
        return F.cross_entropy(self.decoder(flat), targets.reshape(-1))

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the vocabulary, shape (..., vocab_size)."""
        flat = features.reshape(-1, features.size(-1))
        logp = self.adaptive.log_prob(flat) if self.adaptive is not None else F.log_softmax(self.decoder(flat), -1)
        return logp.view(*features.shape[:-1], self.vocab_size)


def detach_hidden(hidden: Hidden) -> Hidden:
    """Cut the graph between BPTT windows while keeping the state values."""
    return [tuple(h.detach() for h in s) if isinstance(s, tuple) else s.detach() for s in hidden]


def _check_args(
    vocab_size: int,
    cell: str,
    embed_dim: int,
    hidden_dim: int,
    num_layers: int,
    dropout: float,
    tie_weights: bool,
    softmax: str,
) -> None:
    if cell not in RNN_CELLS:
        raise ConfigError(f"model.cell={cell!r} is unknown; choose one of {sorted(RNN_CELLS)}")
    for key, value in (
        ("vocab_size", vocab_size),
        ("embed_dim", embed_dim),
        ("hidden_dim", hidden_dim),
        ("num_layers", num_layers),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"model.{key}={value!r} must be a positive integer")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"model.dropout={dropout!r} must be a number in [0, 1)")
    if softmax not in ("full", "adaptive"):
        raise ConfigError(f"model.softmax={softmax!r} is unknown; choose 'full' or 'adaptive'")
    if softmax == "adaptive" and tie_weights:
        raise ConfigError("model.softmax=adaptive cannot tie weights; set model.tie_weights=false")
