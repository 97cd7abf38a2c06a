"""A decoder-only causal Transformer: pre-norm blocks, rotary positions, tied embeddings, a KV cache.

How it reads BPTT windows: like an RNN it is fed the corpus window by window, column by column, and
its state is a per-layer cache of the keys/values of the last ``context`` positions (detached between
windows, so gradients stay inside a window). A window of T tokens therefore attends causally to
itself and to up to ``context`` earlier tokens of the same column::

    cache (≤ context positions)     this window (T)
    k0 k1 ... kM-1                  q0 q1 ... qT-1      query i sees cache + window[0..i]

Generation uses the same cache one token at a time, so nothing is recomputed; evaluation windows
get the same look-back as training windows. Rotary position embeddings are applied relative to the
oldest cached position, so positions never grow with the length of the corpus.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import IncreasingInts, LayerCount, LookBack, PositiveInt, Probability
from lmlab.errors import ConfigError
from lmlab.models.adaptive import adaptive_softmax
from lmlab.models.base import LanguageModel, drop_words, dropout, register_model
from lmlab.models.output import linear_cross_entropy, linear_target_log_probs

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (B, heads, positions, head_dim)


@register_model("transformer")
class TransformerLanguageModel(LanguageModel):
    """Token embedding → ``num_layers`` pre-norm blocks (attention + GELU MLP) → LayerNorm → tied output.

    ``ff_dim`` null means 4 × ``d_model``. ``dropout`` applies to the embeddings, the attention weights
    and each residual branch unless ``dropout_input`` / ``dropout_attention`` / ``dropout_residual`` set
    one of them; ``dropout_embedding`` drops whole words (every feature of a word id, the same words
    in the whole batch, as the RNN's). ``scale_embedding`` multiplies the (tied) input embedding by
    sqrt(d_model), so that it is not drowned by the residual branches at the GPT-2 initialisation.
    ``softmax="adaptive"`` scores words with :class:`~lmlab.models.adaptive.TiedAdaptiveSoftmax` (still
    tied to the embedding) instead of the full output layer.
    """

    dropout_rates = ("dropout_input", "dropout_embedding")  # each Block declares its attention/residual rates

    def __init__(
        self,
        vocab_size: int,
        d_model: PositiveInt = 256,
        num_heads: PositiveInt = 4,
        num_layers: LayerCount = 4,
        ff_dim: PositiveInt | None = None,
        dropout: Probability = 0.1,
        context: LookBack = 128,
        rope_base: PositiveInt = 10000,
        dropout_input: Probability | None = None,
        dropout_attention: Probability | None = None,
        dropout_residual: Probability | None = None,
        dropout_embedding: Probability = 0.0,
        scale_embedding: bool = False,
        softmax: Literal["full", "adaptive"] = "full",
        adaptive_cutoffs: IncreasingInts = (2000, 10000),
    ) -> None:
        super().__init__()
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise ConfigError(
                f"model.d_model={d_model} must split into model.num_heads={num_heads} heads of even size "
                "(rotary positions rotate pairs); pick d_model divisible by 2 * num_heads"
            )
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.context = context
        self.dropout = dropout
        self.dropout_input = dropout if dropout_input is None else dropout_input
        self.dropout_embedding = dropout_embedding
        self.input_scale = math.sqrt(d_model) if scale_embedding else 1.0
        self.num_heads, self.rope_base = num_heads, rope_base
        self.embedding = nn.Embedding(vocab_size, d_model)
        attention = dropout if dropout_attention is None else dropout_attention
        residual = dropout if dropout_residual is None else dropout_residual
        self.blocks = nn.ModuleList(
            Block(d_model, num_heads, ff_dim or 4 * d_model, attention, residual) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self._init_weights(num_layers)
        # The output weight is the embedding; the bias (or the adaptive softmax's head) is the layer's own.
        self.adaptive = (
            adaptive_softmax(d_model, vocab_size, adaptive_cutoffs, tied=True) if softmax == "adaptive" else None
        )
        self.output_bias = nn.Parameter(torch.zeros(vocab_size)) if self.adaptive is None else None

    def _init_weights(self, num_layers: int) -> None:
        # GPT-2's scheme: N(0, 0.02) everywhere, residual projections scaled down by depth.
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(("proj.weight", "down.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def state_fits(self, state: KVCache | None, batch_size: int) -> bool:
        """None, or per block a (keys, values) pair of (B, heads, ≤ context positions, head_dim) tensors."""
        if state is None:
            return True
        head_dim, blocks = self.d_model // self.num_heads, len(self.blocks)
        if not (isinstance(state, (list, tuple)) and len(state) == blocks):
            return False
        for pair in state:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                return False
            for t in pair:
                if not (isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point()):
                    return False
                batch, heads, positions, width = t.shape
                if (batch, heads, width) != (batch_size, self.num_heads, head_dim) or positions > self.context:
                    return False
            if pair[0].shape != pair[1].shape:
                return False
        return True

    def forward(self, tokens: torch.Tensor, state: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        """tokens (T, B) → features (T, B, d_model); the state is the KV cache (None: empty)."""
        x = dropout(self._embed(tokens.t()), self.dropout_input, self.training)  # (B, T, D)
        past = state[0][0].size(2) if state else 0
        cos, sin = self._rotary(past + tokens.size(0), x.device)
        new_state: KVCache = []
        for i, block in enumerate(self.blocks):
            x, (k, v) = block(x, state[i] if state else None, cos, sin)
            new_state.append((k[:, :, -self.context :], v[:, :, -self.context :]))
        return self.norm(x).transpose(0, 1), new_state

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(tokens)
        if self.training and self.dropout_embedding:
            embedded = drop_words(embedded, tokens, self.dropout_embedding, self.vocab_size)
        return embedded * self.input_scale if self.input_scale != 1.0 else embedded

    def _rotary(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.d_model // self.num_heads // 2
        inv_freq = self.rope_base ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
        angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq
        return angles.cos(), angles.sin()  # (length, head_dim / 2)

    @property
    def static_shapes(self) -> bool:
        return self.adaptive is None

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat = features.reshape(-1, self.d_model)
        if self.adaptive is not None:
            return self.adaptive.loss(flat, targets.reshape(-1), self.embedding.weight)
        return linear_cross_entropy(flat, self.embedding.weight, self.output_bias, targets.reshape(-1))

    @property
    def static_state(self) -> bool:
        return False  # the KV cache grows over the first windows, up to `context` positions

    context_vectors_normalised = True  # the final LayerNorm's output

    @property
    def context_dim(self) -> int:
        return self.d_model

    def target_log_probs(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat, flat_targets = features.reshape(-1, self.d_model), targets.reshape(-1)
        if self.adaptive is not None:  # only the targets' clusters are scored
            picked = self.adaptive.target_log_probs(flat, flat_targets, self.embedding.weight)
        else:
            picked = linear_target_log_probs(flat, self.embedding.weight, self.output_bias, flat_targets)
        return picked.float().view(targets.shape)

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        if self.adaptive is not None:
            flat = self.adaptive.log_prob(features.reshape(-1, self.d_model), self.embedding.weight)
            return flat.view(*features.shape[:-1], self.vocab_size)
        return F.log_softmax(F.linear(features, self.embedding.weight, self.output_bias).float(), -1)

    def flops_per_token(self, train_tokens: torch.Tensor | None = None) -> dict[str, float]:
        """Matmul FLOPs per token; attention scores and weighted sums are counted over a full cache
        (``context`` keys per query), the steady state of a run."""
        d = self.d_model
        ff = self.blocks[0].mlp.up.out_features
        dense = len(self.blocks) * (2 * d * 3 * d + 2 * d * d + 2 * 2 * d * ff)
        attention = len(self.blocks) * 2 * 2 * d * self.context
        output = 2.0 * d * self.vocab_size if self.adaptive is None else self.adaptive.flops_per_token(d, train_tokens)
        return {"blocks": float(dense), "attention": float(attention), "output": float(output),
                "forward": float(dense + attention + output)}  # fmt: skip


class Block(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x))."""

    dropout_rates = ("dropout_attention", "dropout_residual")

    def __init__(self, d_model: int, num_heads: int, ff_dim: int, attention: float, residual: float) -> None:
        super().__init__()
        self.num_heads, self.dropout_attention, self.dropout_residual = num_heads, attention, residual
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = MLP(d_model, ff_dim)

    def forward(
        self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        batch, steps, d_model = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, steps, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if cache is not None:  # keys are cached before rotation: positions restart at the oldest one
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        past = k.size(2) - steps
        q_rot, k_rot = _rotate(q, cos[past:], sin[past:]), _rotate(k, cos, sin)
        # Query i (at position past + i) sees keys 0 .. past + i: a causal mask shifted by the cache.
        mask = (
            None
            if past == 0 or steps == 1
            else torch.ones(steps, past + steps, dtype=torch.bool, device=x.device).tril(past)
        )
        attended = F.scaled_dot_product_attention(
            q_rot, k_rot, v, attn_mask=mask, is_causal=past == 0 and steps > 1,
            dropout_p=self.dropout_attention if self.training else 0.0,
        )  # fmt: skip
        attended = attended.transpose(1, 2).reshape(batch, steps, d_model)
        x = x + dropout(self.proj(attended), self.dropout_residual, self.training)
        x = x + dropout(self.mlp(self.norm2(x)), self.dropout_residual, self.training)
        return x, (k, v)


class MLP(nn.Module):
    def __init__(self, d_model: int, ff_dim: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d_model, ff_dim), nn.Linear(ff_dim, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of (B, heads, positions, head_dim) by per-position angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.to(x.dtype)
