"""An adaptive softmax whose word vectors are the input embedding's (tied), for any model.

PyTorch's ``nn.AdaptiveLogSoftmaxWithLoss`` (Grave et al. 2017) makes a step cheap by computing the
rare words' scores only for the tokens whose target is one of them, but it owns its output weights, so
a model using it cannot tie them to its embedding — and tying is worth more than any other single
change on a small corpus. Here the frequent words (ids below the first cutoff; lmlab's ids are sorted
by frequency) and one score per rare-word cluster form the head; each cluster scores its words with
the same embedding rows, after a square projection of its own (initialised to the identity)::

    features h (n, D) ──▶ head: h · [E[:c1] ; cluster vectors]ᵀ ──log-softmax──▶ log p(word | head)
                                                                         └──▶ log p(cluster i)
    rows whose target is in cluster i ──▶ (h P_i) · E[c_i : c_i+1]ᵀ ──log-softmax──▶ log p(word | cluster i)

    log p(rare word) = log p(cluster i) + log p(word | cluster i)

A training or evaluation step pays D·(c1 + clusters) per token plus, for the tokens whose target is
rare, D·D + D·(cluster size): at vocabulary 14k with cutoffs 2000/6000, about a fifth of a full
softmax. The rows are picked by target, so the step's shapes depend on the data (no CUDA graph).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.errors import ConfigError


def _share(tokens: torch.Tensor | None, lo: int, hi: int) -> float:
    """The share of ``tokens`` with ids in lo .. hi - 1 (1.0 when no tokens are given)."""
    return 1.0 if tokens is None else ((tokens >= lo) & (tokens < hi)).float().mean().item()


class AdaptiveSoftmax(nn.AdaptiveLogSoftmaxWithLoss):
    """PyTorch's untied adaptive softmax behind the same three calls as :class:`TiedAdaptiveSoftmax`
    (``weight`` is ignored: it owns its output weights)."""

    def _every_tail(self) -> torch.Tensor:
        """Zero times one entry of each tail parameter: PyTorch skips a cluster no target fell in, and DDP
        needs a gradient for every parameter at every step (``[:1]``: a cluster may be 0 wide)."""
        return 0.0 * sum(p.view(-1)[:1].sum() for p in self.tail.parameters())

    def loss(self, features: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self(features, targets).loss + self._every_tail()

    def target_log_probs(
        self, features: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self(features, targets).output + self._every_tail()

    def log_prob(self, features: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return super().log_prob(features)

    def flops_per_token(self, dim: int, train_tokens: torch.Tensor | None = None) -> float:
        flops = 2.0 * self.head.in_features * self.head.out_features
        for tail, lo, hi in zip(self.tail, self.cutoffs[:-1], self.cutoffs[1:], strict=True):
            flops += _share(train_tokens, lo, hi) * sum(2.0 * m.in_features * m.out_features for m in tail)
        return flops


class TiedAdaptiveSoftmax(nn.Module):
    """Head and cluster parameters of a tied adaptive softmax; the word vectors are passed in as
    ``weight`` (the model's embedding, vocab × D) at every call, so the module holds no copy of them.

    ``cutoffs`` are the first ids of each rare-word cluster, increasing, inside the vocabulary."""

    def __init__(self, dim: int, vocab_size: int, cutoffs: Sequence[int]) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.bounds = [*cutoffs, vocab_size]  # cluster i holds ids bounds[i] .. bounds[i+1] - 1
        self.shortlist = cutoffs[0]
        starts = [0, *self.bounds]
        self.sizes = [hi - lo for lo, hi in zip(starts[:-1], starts[1:], strict=True)]  # shortlist, clusters
        self.register_buffer("cluster_starts", torch.tensor(cutoffs), persistent=False)
        clusters = len(cutoffs)
        self.cluster_weight = nn.Parameter(torch.zeros(clusters, dim))
        self.head_bias = nn.Parameter(torch.zeros(self.shortlist + clusters))
        self.projections = nn.ParameterList(nn.Parameter(torch.eye(dim)) for _ in range(clusters))
        self.tail_biases = nn.ParameterList(nn.Parameter(torch.zeros(size)) for size in self.sizes[1:])

    def _split(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """The word vectors of the shortlist and of each cluster. One split, not a slice each: backward
        then writes their gradients into one vocab × D tensor instead of a zero-filled one per slice."""
        return list(weight.split(self.sizes))

    def _head_log_probs(self, features: torch.Tensor, shortlist: torch.Tensor) -> torch.Tensor:
        head_weight = torch.cat([shortlist, self.cluster_weight.to(shortlist.dtype)])
        return F.log_softmax(F.linear(features, head_weight).float() + self.head_bias, -1)

    def _tail_log_probs(self, i: int, features: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        projected = F.linear(features, self.projections[i].to(features.dtype))
        return F.log_softmax(F.linear(projected, words).float() + self.tail_biases[i], -1)

    def loss(self, features: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of ``targets`` (n,) given ``features`` (n, D)."""
        return self._target_log_probs(features, targets, weight, summed=True) / -targets.numel()

    def target_log_probs(self, features: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """log p(target) per row (n,): each rare target pays for its own cluster only."""
        return self._target_log_probs(features, targets, weight, summed=False)

    def _target_log_probs(
        self, features: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, summed: bool
    ) -> torch.Tensor:
        shortlist, *clusters = self._split(weight)
        head = self._head_log_probs(features, shortlist)
        # A rare word's head column is its cluster's score: column shortlist + i for cluster i.
        cluster = torch.bucketize(targets, self.cluster_starts, right=True)  # 0: the shortlist
        head_column = torch.where(cluster == 0, targets, self.shortlist + cluster - 1)
        picked = head.gather(1, head_column.unsqueeze(1)).squeeze(1)
        total = picked.sum() if summed else picked
        for i in range(len(self.bounds) - 1):
            # A cluster no target fell in still runs (on 0 rows): every parameter then gets a gradient,
            # zero here, as DDP needs from every step.
            rows = (cluster == i + 1).nonzero().squeeze(1)
            tail = self._tail_log_probs(i, features.index_select(0, rows), clusters[i])
            words = tail.gather(1, (targets.index_select(0, rows) - self.bounds[i]).unsqueeze(1)).squeeze(1)
            total = total + words.sum() if summed else total.index_add(0, rows, words)
        return total

    def log_prob(self, features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of every word, (n, vocab_size), for features (n, D)."""
        shortlist, *clusters = self._split(weight)
        head = self._head_log_probs(features, shortlist)
        parts = [head[:, : self.shortlist]]
        for i, words in enumerate(clusters):
            cluster = head[:, self.shortlist + i].unsqueeze(1)
            parts.append(cluster + self._tail_log_probs(i, features, words))
        return torch.cat(parts, 1)

    def flops_per_token(self, dim: int, train_tokens: torch.Tensor | None = None) -> float:
        """Forward multiply-add FLOPs per token; a cluster counts for the share of ``train_tokens`` whose
        target it holds (all of them without ``train_tokens``)."""
        flops = 2.0 * dim * (self.shortlist + len(self.projections))
        for lo, hi in zip(self.bounds[:-1], self.bounds[1:], strict=True):
            flops += _share(train_tokens, lo, hi) * 2.0 * (dim * dim + dim * (hi - lo))
        return flops


def adaptive_softmax(
    dim: int, vocab_size: int, cutoffs: Sequence[int], *, tied: bool
) -> TiedAdaptiveSoftmax | AdaptiveSoftmax:
    """The adaptive softmax over ``vocab_size`` words for features of width ``dim``: tied to the
    embedding or owning its weights. Cutoffs at or past the vocabulary's end are dropped (one config
    serves any vocabulary); none left is a config error."""
    kept = [c for c in cutoffs if 0 < c < vocab_size - 1]
    if not kept:
        raise ConfigError(
            f"model.adaptive_cutoffs={list(cutoffs)} has no cutoff below the vocabulary size ({vocab_size}); "
            f"give one below {vocab_size - 1}, or use model.softmax=full"
        )
    if tied:
        return TiedAdaptiveSoftmax(dim, vocab_size, kept)
    return AdaptiveSoftmax(dim, vocab_size, kept, div_value=4.0)
