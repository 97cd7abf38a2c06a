"""A Kneser-Ney n-gram model of the training split: mixed into a trained model at evaluation
(``method=ngram``) or inside one while it trains (:mod:`lmlab.models.ngram_mixture`).

Interpolated modified Kneser-Ney (Chen & Goodman 1998, "An empirical study of smoothing techniques for
language modeling"). For order k = 1 .. n, with h the last k-1 words and h' the last k-2::

    p_k(w | h) = max(c_k(h w) - D_k(c), 0) / c_k(h .)  +  gamma_k(h) * p_{k-1}(w | h')
    gamma_k(h) = (D_k1 * N1(h .) + D_k2 * N2(h .) + D_k3 * N3+(h .)) / c_k(h .)         p_0 = 1 / V

c_n are the counts of the n-grams themselves; below the top order c_k counts the distinct words seen
*before* the k-gram (its continuation count: "Francisco" is frequent but follows only "San", so it is a
poor guess after an unseen context). D_k1, D_k2, D_k3 are each order's discounts for counts 1, 2, 3+,
estimated from its counts of counts. A context never seen at order k hands p_{k-1} on unchanged, so every
p_k is a distribution over the vocabulary.

Every n-gram is packed into one int64 key (base-V digits, the oldest word most significant), so each
order is a sorted key tensor with its counts and a lookup is one ``searchsorted``: building and scoring
take no Python step per token. The keys bound the order: ``V ** order`` must fit in 63 bits
(:func:`max_order`; order 4 for a 33k vocabulary, 3 for WikiText-103's 267k).

How a column's first positions are scored: their history is what the column holds before them, as for
the model (whose state also starts empty there); a shorter history uses the lower orders only.

Leave-one-out (``leave_one_out=True``, for the training text's own positions): each position is scored
with its own occurrence taken out of the counts, as if the text had not held it — one fewer n-gram at
the top order, and below it one fewer distinct word before the k-gram where that (k+1)-gram occurred only
there. Without it a model trained beside the counts learns to trust them on the training text, where
every n-gram has been seen at least once, far more than on text they have not seen. The discounts stay
the whole text's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmlab.errors import ConfigError

KEY_BITS = 63


def max_order(vocab_size: int) -> int:
    """The highest order whose packed keys fit in an int64 for this vocabulary size."""
    return max(1, int(KEY_BITS * math.log(2) / math.log(max(vocab_size, 2))))


def check_order(order: int, vocab_size: int, key: str) -> None:
    """Refuse, in one line naming the config ``key``, an order whose n-grams do not fit 64-bit keys."""
    if order > max_order(vocab_size):
        raise ConfigError(
            f"{key}={order} is too high for a {vocab_size:,}-word vocabulary (its n-grams do not fit "
            f"64-bit keys); give {key}={max_order(vocab_size)} or less"
        )


def check_history(order: int, key: str) -> None:
    """Refuse an order below 2 where the counts are mixed with a model by the words before each target (the
    ``ngram`` method, the counts inside a model): order 1 conditions on no word, and there is nothing to mix by."""
    if order < 2:
        raise ConfigError(f"{key}={order} leaves no word of history to count; give {key}=2 or more (4 is usual)")


def pack(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(..., k) word ids as one key each (the first column the most significant digit)."""
    key = torch.zeros(words.shape[:-1], dtype=torch.long, device=words.device)
    for i in range(words.size(-1)):
        key = key * vocab_size + words[..., i]
    return key


def ngram_keys(tokens: torch.Tensor, k: int, vocab_size: int) -> torch.Tensor:
    """The key of every k-gram of a 1-D token sequence, in order."""
    if tokens.numel() < k:
        return torch.zeros(0, dtype=torch.long)
    return pack(tokens.unfold(0, k, 1), vocab_size)


def discounts(counts: torch.Tensor) -> torch.Tensor:
    """[0, D1, D2, D3+] from the counts of counts (Chen & Goodman's estimates), each clamped to [0, its
    count]; 0.75-like fallbacks where a count of counts is missing (tiny corpora)."""
    n = [int((counts == i).sum()) for i in range(1, 5)]
    if min(n) == 0:
        return torch.tensor([0.0, 0.5, 0.75, 0.75], dtype=torch.float64)
    y = n[0] / (n[0] + 2 * n[1])
    values = [1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2]]
    return torch.tensor([0.0] + [min(max(d, 0.0), i + 1) for i, d in enumerate(values)], dtype=torch.float64)


@dataclass
class _Order:
    """One order's table: its k-gram keys (sorted) and counts, and per context (sorted) the total and the
    back-off weight gamma."""

    keys: torch.Tensor
    counts: torch.Tensor
    discount: torch.Tensor  # [0, D1, D2, D3+]
    contexts: torch.Tensor
    context_total: torch.Tensor
    context_gamma: torch.Tensor

    @classmethod
    def from_counts(cls, keys: torch.Tensor, counts: torch.Tensor, vocab_size: int) -> _Order:
        discount = discounts(counts)
        contexts, which = torch.unique_consecutive(keys // vocab_size, return_inverse=True)  # keys are sorted
        total = torch.zeros(contexts.numel(), dtype=torch.float64).index_add_(0, which, counts.double())
        taken = torch.zeros_like(total).index_add_(0, which, discount[counts.clamp(max=3)])
        return cls(keys, counts, discount, contexts, total, taken / total)


def _find(table: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(found, index) of each key in a sorted table."""
    if table.numel() == 0:
        return torch.zeros_like(keys, dtype=torch.bool), torch.zeros_like(keys)
    index = torch.searchsorted(table, keys).clamp(max=table.numel() - 1)
    return table[index] == keys, index


class KneserNey:
    """Interpolated modified Kneser-Ney of ``order`` over ``tokens`` (1-D ids below ``vocab_size``)."""

    def __init__(self, tokens: torch.Tensor, vocab_size: int, order: int) -> None:
        check_order(order, vocab_size, "ngram.order")
        tokens = tokens.detach().to("cpu", torch.long).flatten()
        self.vocab_size, self.order = vocab_size, order
        # From the top order down, each order's distinct n-grams counted once: the top order's are its
        # table; below it, dropping the first word of each distinct (k+1)-gram counts the words seen before
        # each k-gram.
        keys, counts = torch.unique(ngram_keys(tokens, order, vocab_size), return_counts=True)
        orders, longer = [_Order.from_counts(keys, counts, vocab_size)], keys
        for k in range(order - 1, 0, -1):
            keys, counts = torch.unique(longer % vocab_size**k, return_counts=True)
            orders.append(_Order.from_counts(keys, counts, vocab_size))
            if k > 1:
                longer = torch.unique(ngram_keys(tokens, k, vocab_size))
        self.orders: list[_Order] = orders[::-1]  # order 1 first
        self.tokens = tokens
        self._raw: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # leave-one-out's raw counts, by order

    def probs(self, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """p(target | history) in float64 for (N, order-1) histories (oldest first; -1 where a position has
        no word, i.e. before the start of its text) and (N,) targets."""
        return self.score(history, targets)[0]

    def score(
        self, history: torch.Tensor, targets: torch.Tensor, leave_one_out: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(p(target | history) in float64, the number of history words the longest context seen in the
        counts has: 0 .. order-1), for histories and targets as :meth:`probs` takes them.
        ``leave_one_out``: the positions are occurrences in the counted text, each scored without itself."""
        history, targets = history.to("cpu", torch.long), targets.to("cpu", torch.long)
        p = torch.full(targets.shape, 1.0 / self.vocab_size, dtype=torch.float64)
        matched = torch.zeros(targets.shape, dtype=torch.long)
        for k, table in enumerate(self.orders, start=1):
            if table.keys.numel() == 0:  # a text too short for this order: it hands p on unchanged
                continue
            words = history[:, history.size(1) - (k - 1) :]
            present = (words >= 0).all(dim=1)
            context = pack(words.clamp_min(0), self.vocab_size)
            seen, at = _find(table.contexts, context)
            seen &= present
            found, where = _find(table.keys, context * self.vocab_size + targets)
            count = torch.where(found, table.counts[where], 0)
            total = table.context_total[at]
            taken = table.context_gamma[at] * total  # the mass the discounts take from this context
            if leave_one_out:
                removed = (found & self._only_there(k, history, targets)).long()
                less = count - removed
                taken = taken + table.discount[less.clamp(max=3)] - table.discount[count.clamp(max=3)]
                count, total = less, total - removed
                seen &= total > 0
            total = total.clamp_min(1)  # where unseen: not used
            mixed = ((count - table.discount[count.clamp(max=3)]).clamp_min(0) + taken * p) / total
            p = torch.where(seen, mixed, p)
            matched = torch.where(seen, k - 1, matched)
        return p, matched

    def _only_there(self, k: int, history: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Whether taking a position's occurrence out takes one count off its k-gram at order k: at the top
        order always (its own n-gram); below it when the (k+1)-gram ending there occurred only there
        (then one distinct word before the k-gram is gone). False where the history is too short to say."""
        if k == self.order:
            return (history >= 0).all(dim=1)
        words = history[:, history.size(1) - k :]
        keys, counts = self._raw_counts(k + 1)
        if keys.numel() == 0:
            return torch.zeros(targets.shape, dtype=torch.bool)
        found, where = _find(keys, pack(torch.cat([words.clamp_min(0), targets[:, None]], 1), self.vocab_size))
        return (words >= 0).all(dim=1) & found & (counts[where] == 1)

    def _raw_counts(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sorted keys of the text's k-grams and how often each occurs (built on first use)."""
        if k == self.order:
            return self.orders[-1].keys, self.orders[-1].counts
        if k not in self._raw:
            self._raw[k] = torch.unique(ngram_keys(self.tokens, k, self.vocab_size), return_counts=True)
        return self._raw[k]

    def distribution(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p(w | history) for every word, (N, vocab) float64; the matched context length as :meth:`score`)
        for (N, order-1) histories: each order scales the one below by its back-off weight where its
        context was seen and adds the discounted counts of the words seen after that context. Order 1 is
        the same after every history: it is computed once."""
        history = history.to("cpu", torch.long)
        rows = history.size(0)
        p = torch.full((1, self.vocab_size), 1.0 / self.vocab_size, dtype=torch.float64)
        self._back_off(p, self.orders[0], torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool))
        p = p.expand(rows, -1).clone()
        matched = torch.zeros(rows, dtype=torch.long)
        for k, table in enumerate(self.orders[1:], start=2):
            words = history[:, history.size(1) - (k - 1) :]
            context = pack(words.clamp_min(0), self.vocab_size)
            seen = self._back_off(p, table, context, (words >= 0).all(dim=1))
            matched[seen] = k - 1
        return p, matched

    def _back_off(self, p: torch.Tensor, table: _Order, context: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Make each row of ``p`` (the order below's distributions) this order's where its context was seen,
        in place; returns where it was."""
        if table.keys.numel() == 0:  # a text too short for this order
            return torch.zeros_like(present)
        seen, at = _find(table.contexts, context)
        seen &= present
        p.mul_(torch.where(seen, table.context_gamma[at], 1.0).unsqueeze(1))
        rows, context, at = seen.nonzero().squeeze(1), context[seen], at[seen]
        # the words seen after each context: one contiguous run of the sorted keys
        first = torch.searchsorted(table.keys, context * self.vocab_size)
        length = torch.searchsorted(table.keys, (context + 1) * self.vocab_size) - first
        owner = torch.repeat_interleave(torch.arange(rows.numel()), length)
        entry = torch.arange(int(length.sum())) - torch.repeat_interleave(length.cumsum(0) - length, length)
        entry += first[owner]
        count = table.counts[entry]
        gained = (count - table.discount[count.clamp(max=3)]).clamp_min(0) / table.context_total[at][owner]
        p.index_put_((rows[owner], table.keys[entry] % self.vocab_size), gained, accumulate=True)
        return seen

    def column_probs(self, columns: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """p of each target of a (L, B) stream's columns, rows 1 .. ``rows`` (default all), flattened row
        by row: the order in which evaluation windows hand them out."""
        rows = columns.size(0) - 1 if rows is None else rows
        columns = columns.to("cpu", torch.long)
        width, batch = self.order - 1, columns.size(1)
        padded = torch.cat([columns.new_full((width, batch), -1), columns])
        # history of the target at row r: padded rows r .. r + width - 1 (= rows r - width .. r - 1)
        history = [padded[i + 1 : i + 1 + rows] for i in range(width)]
        history = torch.stack(history, dim=-1) if width else columns.new_zeros(rows, batch, 0)
        return self.probs(history.reshape(-1, width), columns[1 : 1 + rows].reshape(-1))
