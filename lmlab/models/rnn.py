"""Recurrent word-level language models (LSTM or GRU), one ``nn.Module`` for both cells.

Layers are separate single-layer RNNs so that each keeps PyTorch's fused kernel while the last layer
can be sized to the embedding (weight tying with hidden_dim != embed_dim, as in AWD-LSTM) and dropout
sits between layers.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import IncreasingInts, LayerCount, NonNegativeFloat, PositiveInt, Probability
from lmlab.errors import ConfigError
from lmlab.models.adaptive import adaptive_softmax
from lmlab.models.base import LanguageModel, State, drop_words, keep_mask, register_model, same_layout
from lmlab.models.output import linear_cross_entropy, linear_target_log_probs

LayerState = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
Hidden = list[LayerState]
RNN_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}  # cell name -> torch module (a fused kernel each)


@register_model("rnn")
class RNNLanguageModel(LanguageModel):
    """Embedding → stacked LSTM/GRU → (tied) softmax over the vocabulary.

    ``softmax="adaptive"`` replaces the full output layer by an adaptive softmax (vocabulary ids must be
    sorted by frequency, as lmlab's are): tied, :class:`~lmlab.models.adaptive.TiedAdaptiveSoftmax`
    (the embedding's rows score the words); untied, PyTorch's ``nn.AdaptiveLogSoftmaxWithLoss``.

    AWD-LSTM regularisation (Merity et al. 2017), all off by default: ``dropout_input`` /
    ``dropout_hidden`` (on embeddings / between layers; null = ``dropout``), ``locked_dropout`` (one mask
    per sequence, shared over time), ``dropout_embedding`` (drops whole words), ``weight_drop``
    (DropConnect on hidden-to-hidden weights), and the activation penalties ``ar_alpha``/``tar_beta``
    returned by :meth:`regularization`.

    ``sparse_embedding`` gives an untied model sparse embedding gradients (faster; needs SGD or
    NT-ASGD). Tied models always use them, summed into the decoder's dense gradient.
    """

    dropout_rates = ("dropout", "dropout_input", "dropout_hidden", "dropout_embedding", "weight_drop")

    def __init__(
        self,
        vocab_size: int,
        cell: str = "lstm",
        embed_dim: PositiveInt = 650,
        hidden_dim: PositiveInt = 650,
        num_layers: LayerCount = 2,
        dropout: Probability = 0.5,
        tie_weights: bool = True,
        softmax: Literal["full", "adaptive"] = "full",
        adaptive_cutoffs: IncreasingInts = (2000, 10000),
        dropout_input: Probability | None = None,
        dropout_hidden: Probability | None = None,
        dropout_embedding: Probability = 0.0,
        locked_dropout: bool = False,
        weight_drop: Probability = 0.0,
        ar_alpha: NonNegativeFloat = 0.0,
        tar_beta: NonNegativeFloat = 0.0,
        sparse_embedding: bool = False,
    ) -> None:
        super().__init__()
        if cell not in RNN_CELLS:
            raise ConfigError(f"model.cell={cell!r} is unknown; choose one of {sorted(RNN_CELLS)}")
        if sparse_embedding and tie_weights:
            raise ConfigError(
                "model.sparse_embedding=true does nothing for a tied model (its embedding gradient is already "
                "sparse and folded into the decoder's); set model.sparse_embedding=false or model.tie_weights=false"
            )
        self.cell, self.vocab_size = cell, vocab_size
        self.dropout, self.locked_dropout = dropout, locked_dropout
        self.dropout_input = dropout if dropout_input is None else dropout_input
        self.dropout_hidden = dropout if dropout_hidden is None else dropout_hidden
        self.dropout_embedding, self.weight_drop = dropout_embedding, weight_drop
        self.ar_alpha, self.tar_beta = ar_alpha, tar_beta
        self._last_raw_output: torch.Tensor | None = None
        # Sparse embedding gradients: only the rows of this batch's words instead of a dense V×D
        # tensor of zeros. Tied, the decoder's dense gradient absorbs them in place (~90 MB less peak
        # memory at vocabulary 33k, any optimizer); untied they stay sparse, which needs an optimizer
        # that takes sparse gradients (SGD, NT-ASGD), so there it is the ``sparse_embedding`` option.
        self.tied = tie_weights
        self.embedding = nn.Embedding(vocab_size, embed_dim, sparse=tie_weights or sparse_embedding)
        out_dim = embed_dim if tie_weights else hidden_dim
        sizes = [embed_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.rnns = nn.ModuleList(RNN_CELLS[cell](sizes[i], sizes[i + 1]) for i in range(num_layers))
        if softmax == "adaptive":
            self.decoder = None
            self.adaptive = adaptive_softmax(out_dim, vocab_size, adaptive_cutoffs, tied=tie_weights)
        else:
            self.adaptive = None
            # A tied decoder is built on the meta device: its own V×D weight would only be thrown away,
            # and at vocabulary 33k that transient alone is ~90 MB of peak memory.
            self.decoder = nn.Linear(out_dim, vocab_size, device="meta" if tie_weights else None)
            if tie_weights:
                self.decoder.weight = self.embedding.weight
                self.decoder.bias = nn.Parameter(torch.zeros(vocab_size))
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if self.decoder is not None:
            nn.init.zeros_(self.decoder.bias)
            if not self.tied:
                nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    @property
    def sparse_gradients(self) -> bool:
        return self.embedding.sparse and not self.tied

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> Hidden:
        hidden: Hidden = []
        for rnn in self.rnns:
            zeros = torch.zeros(1, batch_size, rnn.hidden_size, device=device)
            hidden.append((zeros, zeros.clone()) if self.cell == "lstm" else zeros)
        return hidden

    def state_fits(self, state: State, batch_size: int) -> bool:
        # This class's init_state, not a subclass's: a pointer head wraps it in a state of its own.
        return same_layout(state, RNNLanguageModel.init_state(self, batch_size, "meta"))

    @property
    def context_dim(self) -> int:
        return self.rnns[-1].hidden_size

    def forward(self, tokens: torch.Tensor, hidden: Hidden) -> tuple[torch.Tensor, Hidden]:
        """tokens (T, B) → features (T, B, out_dim) for :meth:`loss` / :meth:`log_probs`, new hidden."""
        masks = self._shared_masks(tokens)
        x = self._drop(self._embed(tokens), self.dropout_input, masks[0])
        new_hidden: Hidden = []
        last = len(self.rnns) - 1
        for i, rnn in enumerate(self.rnns):
            x, state = self._run_layer(rnn, x, hidden[i])
            new_hidden.append(state)
            if i == last:
                self._last_raw_output = x if self.training and self.tar_beta else None
            x = self._drop(x, self.dropout if i == last else self.dropout_hidden, masks[i + 1])
        return x, new_hidden

    def _shared_masks(self, tokens: torch.Tensor) -> list[torch.Tensor | None]:
        """Dropout masks of every site of this step (embeddings, between layers, output) in one draw on a
        CPU when the sites share p and width, as the tied default's do: 4 operators instead of 3 per
        site. Otherwise (and on GPUs, where F.dropout is one fused kernel) each site draws its own."""
        sites = [self.dropout_input, *[self.dropout_hidden] * (len(self.rnns) - 1), self.dropout]
        widths = {self.embedding.embedding_dim, *(rnn.hidden_size for rnn in self.rnns)}
        shared = (
            self.training
            and not self.locked_dropout
            and tokens.device.type == "cpu"
            and len(widths) == 1
            and len(set(sites)) == 1
            and sites[0] > 0
            and not torch.is_autocast_enabled("cpu")
        )
        if not shared:
            return [None] * len(sites)
        shape = (len(sites), *tokens.shape, widths.pop())
        return list(keep_mask(shape, sites[0], torch.float32, tokens.device).unbind(0))

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(tokens)
        if not (self.training and self.dropout_embedding):
            return emb
        return drop_words(emb, tokens, self.dropout_embedding, self.vocab_size)

    def _drop(self, x: torch.Tensor, p: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not (self.training and p):
            return x
        if mask is not None:
            return x * mask
        if not self.locked_dropout and x.device.type != "cpu":
            return F.dropout(x, p, training=True)  # one fused kernel on GPUs
        shape = (1, *x.shape[1:]) if self.locked_dropout else x.shape  # locked: one mask for all steps
        return x * keep_mask(shape, p, x.dtype, x.device)

    def _run_layer(self, rnn: nn.RNNBase, x: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        if not (self.training and self.weight_drop):
            return rnn(x, state)
        # DropConnect on the recurrent weights, passed to the module's own fused kernel for this call
        # (functional_call swaps the tensor in and out), so the parameter itself is never replaced.
        dropped = F.dropout(rnn.weight_hh_l0, self.weight_drop, training=True)
        return torch.func.functional_call(rnn, {"weight_hh_l0": dropped}, (x, state))

    def regularization(self, features: torch.Tensor) -> torch.Tensor | None:
        """AR (``ar_alpha`` × mean squared output) + TAR (``tar_beta`` × mean squared step-to-step change
        of the last layer's raw output); None unless enabled and training."""
        terms = []
        if self.training and self.ar_alpha:
            terms.append(self.ar_alpha * features.pow(2).mean())
        if self.training and self.tar_beta and self._last_raw_output is not None:
            raw = self._last_raw_output
            terms.append(self.tar_beta * (raw[1:] - raw[:-1]).pow(2).mean())
        return sum(terms[1:], terms[0]) if terms else None

    def flops_per_token(self, train_tokens: torch.Tensor | None = None) -> dict[str, float]:
        """Forward multiply-add FLOPs per token from the layer shapes (embedding lookups count 0).

        For the adaptive softmax only the targets in a tail cluster pay for that cluster's projection
        and output: ``train_tokens`` gives each cluster's share (without it all tails are counted).
        """
        gates = 4 if self.cell == "lstm" else 3
        rnn = sum(2 * gates * r.hidden_size * (r.input_size + r.hidden_size) for r in self.rnns)
        if self.adaptive is None:
            out = 2.0 * self.decoder.in_features * self.vocab_size
        else:
            out = self.adaptive.flops_per_token(self.rnns[-1].hidden_size, train_tokens)
        return {"rnn": float(rnn), "output": out, "forward": float(rnn + out)}

    @property
    def static_shapes(self) -> bool:
        return self.adaptive is None

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat = features.reshape(-1, features.size(-1))
        if self.adaptive is not None:
            return self.adaptive.loss(flat, targets.reshape(-1), self.embedding.weight)
        return linear_cross_entropy(flat, self.decoder.weight, self.decoder.bias, targets.reshape(-1))

    def target_log_probs(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat, flat_targets = features.reshape(-1, features.size(-1)), targets.reshape(-1)
        if self.adaptive is None:
            picked = linear_target_log_probs(flat, self.decoder.weight, self.decoder.bias, flat_targets)
        else:
            picked = self.adaptive.target_log_probs(flat, flat_targets, self.embedding.weight)
        return picked.float().view(targets.shape)

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.reshape(-1, features.size(-1))
        if self.adaptive is not None:
            logp = self.adaptive.log_prob(flat, self.embedding.weight)
        else:
            logp = F.log_softmax(self.decoder(flat), -1)
        return logp.view(*features.shape[:-1], self.vocab_size)
