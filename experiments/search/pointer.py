"""Search-only model (round K): an RNN whose output mixes the softmax with a pointer over its last
``pointer_window`` input words (pointer sentinel, Merity et al. 2016, "Pointer sentinel mixture models").

    q_t = tanh(W h_t + b)        z_j = q_t . h_j  for the last L positions j <= t      z_s = q_t . s
    [a_1 .. a_L, g] = softmax([z_1 .. z_L, z_s])
    p(w) = g * p_softmax(w) + sum over j with x_j = w of a_j

The sentinel's share g is what the softmax keeps; the rest goes to words seen in the window. Static: the
weights are trained, then frozen; the model conditions on the previous words only (like a Transformer's
attention over its context). The window's hidden states and ids are carried between windows in the state.

The features handed to loss/log_probs carry what the mixture needs, concatenated on the last axis:
[h (D), a (L), g (1), ids (L)] (ids as fp32: exact below 2**24).

    python -m lmlab.run plugins=[pointer] model.name=pointer_rnn model.pointer_window=100 ...
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models import RNNLanguageModel, register_model


def _target_log_probs(model: RNNLanguageModel, flat: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p_softmax(target) per row."""
    if model.adaptive is None:
        return F.log_softmax(model.decoder(flat).float(), -1).gather(1, targets.unsqueeze(1)).squeeze(1)
    ada, weight = model.adaptive, model.embedding.weight
    shortlist, *clusters = ada._split(weight)
    head = ada._head_log_probs(flat, shortlist)
    cluster = torch.bucketize(targets, ada.cluster_starts, right=True)
    column = torch.where(cluster == 0, targets, ada.shortlist + cluster - 1)
    out = head.gather(1, column.unsqueeze(1)).squeeze(1)
    for i in range(len(ada.bounds) - 1):
        rows = (cluster == i + 1).nonzero().squeeze(1)
        tail = ada._tail_log_probs(i, flat.index_select(0, rows), clusters[i])
        picked = tail.gather(1, (targets.index_select(0, rows) - ada.bounds[i]).unsqueeze(1)).squeeze(1)
        out = out.index_add(0, rows, picked)
    return out


@register_model("pointer_rnn")
class PointerRNN(RNNLanguageModel):
    def __init__(self, vocab_size: int, pointer_window: int = 100, **kwargs) -> None:
        super().__init__(vocab_size, **kwargs)
        dim = self.rnns[-1].hidden_size
        self.window, self.dim = pointer_window, dim
        self.query = nn.Linear(dim, dim)
        self.sentinel = nn.Parameter(torch.zeros(dim))
        # The sentinel's score starts high enough that the softmax keeps ~90% of the mass: with all scores
        # equal it would start at 1/(L+1), and the model would first have to learn to trust its softmax.
        self.sentinel_bias = nn.Parameter(torch.tensor(math.log(9.0 * pointer_window)))

    def init_state(self, batch_size, device="cpu"):
        hidden = super().init_state(batch_size, device)
        keys = torch.zeros(self.window, batch_size, self.dim, device=device)
        ids = torch.full((self.window, batch_size), -1, dtype=torch.long, device=device)
        return (hidden, keys, ids)

    def forward(self, tokens, state):
        hidden, mem_keys, mem_ids = state
        h, hidden = super().forward(tokens, hidden)
        T, L = tokens.size(0), self.window
        keys = torch.cat([mem_keys.to(h.dtype), h])  # (L+T, B, D)
        ids = torch.cat([mem_ids, tokens])  # (L+T, B)
        q = torch.tanh(self.query(h))  # (T, B, D)
        scores = torch.einsum("tbd,jbd->tbj", q, keys)  # (T, B, L+T)
        band = (torch.arange(T, device=h.device).view(T, 1) + 1 + torch.arange(L, device=h.device)).view(T, 1, L)
        band_scores = scores.gather(2, band.expand(T, h.size(1), L))
        band_ids = ids.t().unsqueeze(0).expand(T, -1, -1).gather(2, band.expand(T, h.size(1), L))  # (T, B, L)
        band_scores = band_scores.masked_fill(band_ids < 0, float("-inf"))
        sentinel = (q * self.sentinel.to(q.dtype)).sum(-1, keepdim=True) + self.sentinel_bias
        attn = torch.softmax(torch.cat([band_scores, sentinel], -1).float(), -1)
        features = torch.cat([h.float(), attn, band_ids.clamp_min(0).float()], -1)
        return features, (hidden, keys[-L:], ids[-L:])

    def _split(self, features):
        D, L = self.dim, self.window
        h, attn, ids = features.split([D, L + 1, L], -1)
        return h, attn[..., :L], attn[..., L:], ids.long()

    def regularization(self, features):
        return super().regularization(self._split(features)[0])

    def loss(self, features, targets):
        h, a, g, ids = self._split(features)
        flat_t = targets.reshape(-1)
        logp = _target_log_probs(self, h.reshape(-1, self.dim).to(self.embedding.weight.dtype), flat_t)
        ptr = (a * (ids == targets.unsqueeze(-1))).sum(-1).reshape(-1)
        p = g.reshape(-1) * logp.exp() + ptr
        return -p.clamp_min(1e-30).log().mean()

    def log_probs(self, features):
        h, a, g, ids = self._split(features)
        vocab = super().log_probs(h).exp() * g
        vocab = vocab.scatter_add(-1, ids, a)
        return vocab.clamp_min(1e-30).log()

    def flops_per_token(self, train_tokens=None):
        parts = super().flops_per_token(train_tokens)
        parts["pointer"] = 2.0 * self.dim * (self.dim + self.window + 1)
        parts["forward"] += parts["pointer"]
        return parts
