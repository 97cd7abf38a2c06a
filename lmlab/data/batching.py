"""How a token stream is cut into the windows a model reads (the data owns this, not the trainer).

A split's token stream is cut into ``batch_size`` contiguous columns, read top to bottom in windows
of ``bptt`` steps; a window's targets are its inputs shifted by one step. With batch_size 4 and
bptt 2, the stream a b c ... x becomes::

    columns                  window 1             window 2
    ┌ a g m s ┐              inputs   targets     inputs   targets
    │ b h n t │              a g m s  b h n t     c i o u  d j p v
    │ c i o u │              b h n t  c i o u     d j p v  e k q w
    │ d j p v │
    │ e k q w │              Each column is one running text: the model's state after window 1
    └ f l r x ┘              (its hidden state, or a Transformer's KV cache) carries into window 2.

Variable-length BPTT (AWD-LSTM) draws each training window's length around ``bptt`` so that window
edges move between epochs; a window shorter than ``bptt`` asks for a proportionally smaller step
(:attr:`Window.lr_scale`).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from typing import NamedTuple

import torch


class Window(NamedTuple):
    inputs: torch.Tensor  # (T, B) token ids
    targets: torch.Tensor  # (T, B): the next token of each input
    lr_scale: float = 1.0  # T / bptt for variable-length windows, else 1


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a token stream into ``batch_size`` contiguous columns: shape (steps, batch_size).

    A view of ``data``, not a copy; BPTT windows of it are strided slices the embedding gathers from."""
    steps = data.size(0) // batch_size
    return data[: steps * batch_size].view(batch_size, steps).t()


class TokenStream:
    """One split as ``batch_size`` columns, handed out in BPTT windows (see the module docstring)."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, bptt: int, variable_bptt: bool = False) -> None:
        self.columns = batchify(tokens, batch_size)
        self.batch_size = batch_size
        self.bptt = bptt
        self.variable_bptt = variable_bptt

    def shard(self, rank: int, world_size: int) -> TokenStream:
        """This rank's share of the columns as a new stream (``batch_size`` must divide by ``world_size``):
        rank r of W reads columns [r·B/W, (r+1)·B/W), so W ranks together read what one process would."""
        if world_size == 1:
            return self
        share = self.batch_size // world_size
        part = copy.copy(self)
        part.columns, part.batch_size = self.columns[:, rank * share : (rank + 1) * share], share
        return part

    def to(self, device: torch.device | str) -> TokenStream:
        self.columns = self.columns.to(device)
        return self

    @property
    def num_tokens(self) -> int:
        """Tokens predicted in one pass (every column's steps but the last)."""
        return (self.columns.size(0) - 1) * self.batch_size

    def num_windows(self, limit: int | None = None) -> int:
        """Windows in one pass (fixed-length count; a variable-length pass has about as many)."""
        n = -(-(self.columns.size(0) - 1) // self.bptt)
        return n if limit is None else min(n, limit)

    def windows(self, epoch: int = 1, limit: int | None = None) -> Iterator[Window]:
        """At most ``limit`` windows in order; variable-length ones are drawn from ``epoch`` as seed, so
        a resumed epoch sees the same windows."""
        if self.variable_bptt:
            return self._variable_windows(random.Random(epoch), limit)
        return self._fixed_windows(limit)

    def _fixed_windows(self, limit: int | None) -> Iterator[Window]:
        last = self.columns.size(0) - 1
        for n, start in enumerate(range(0, last, self.bptt)):
            if limit is not None and n >= limit:
                return
            yield self._window(start, min(self.bptt, last - start))

    def _variable_windows(self, rng: random.Random, limit: int | None) -> Iterator[Window]:
        """Each window ~N(bptt, 5) long (~N(bptt/2, 5) with p=0.05), at least 5 steps."""
        start, n, last = 0, 0, self.columns.size(0) - 1
        while start < last and (limit is None or n < limit):
            mean = self.bptt if rng.random() < 0.95 else self.bptt / 2
            length = min(max(5, int(rng.gauss(mean, 5))), last - start)
            yield self._window(start, length, lr_scale=length / self.bptt)
            start, n = start + length, n + 1

    def _window(self, start: int, length: int, lr_scale: float = 1.0) -> Window:
        # Streams may hold int32 ids (a memory-mapped corpus); a window is the one int64 copy models see.
        inputs, targets = self.columns[start : start + length], self.columns[start + 1 : start + 1 + length]
        return Window(inputs.long(), targets.long(), lr_scale)
