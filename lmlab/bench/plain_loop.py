"""The plain PyTorch training loop that ``lmlab.bench`` measures lmlab against, same shapes, same run.

What a user would write from pytorch/examples' word_language_model: ``nn.Embedding`` → ``nn.LSTM``/``nn.GRU``
(stacked, dropout between layers) → ``nn.Linear`` (tied to the embedding when the sizes allow) →
``F.cross_entropy`` → ``clip_grad_norm_`` → the optimizer, with the hidden state carried and detached
between windows. Registered per model name (:data:`BASELINES`); a model without one is benched alone.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.data.batching import TokenStream, Window
from lmlab.runtime.devices import synchronize


class PlainRNN(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        cell: str,
        embed_dim: int,
        hidden_dim: int,
        num_layers: int,
        dropout: float,
        tie_weights: bool,
    ) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.embedding, self.drop = nn.Embedding(vocab_size, embed_dim), nn.Dropout(dropout)
        self.rnn = rnn(embed_dim, hidden_dim, num_layers, dropout=dropout if num_layers > 1 else 0.0)
        self.decoder = nn.Linear(hidden_dim, vocab_size)
        if tie_weights and embed_dim == hidden_dim:
            self.decoder.weight = self.embedding.weight

    def forward(self, tokens: torch.Tensor, hidden: Any) -> tuple[torch.Tensor, Any]:
        output, hidden = self.rnn(self.drop(self.embedding(tokens)), hidden)
        return self.decoder(self.drop(output)), hidden


def plain_rnn(vocab_size: int, arguments: dict[str, Any]) -> nn.Module | None:
    """The plain loop's RNN; None for an adaptive softmax or a body with heads (a plain full-softmax RNN would
    not be the same shapes)."""
    if arguments.get("softmax", "full") != "full" or arguments.get("heads"):
        return None
    keys = ("cell", "embed_dim", "hidden_dim", "num_layers", "dropout", "tie_weights")
    defaults = {
        "cell": "lstm",
        "embed_dim": 650,
        "hidden_dim": 650,
        "num_layers": 2,
        "dropout": 0.5,
        "tie_weights": True,
    }
    return PlainRNN(vocab_size, **{k: arguments.get(k, defaults[k]) for k in keys})


BASELINES: dict[str, Callable[[int, dict[str, Any]], nn.Module | None]] = {"rnn": plain_rnn}


class PlainLoop:
    """The plain training step, with the hidden state carried (and detached) from one window to the next."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        clip: float | None,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        self.model, self.optimizer, self.clip, self.autocast_dtype = model.train(), optimizer, clip, autocast_dtype
        self.hidden: Any = None

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if self.hidden is not None:
            h = self.hidden
            self.hidden = tuple(x.detach() for x in h) if isinstance(h, tuple) else h.detach()
        dtype = self.autocast_dtype
        with torch.autocast(inputs.device.type, dtype) if dtype else contextlib.nullcontext():
            logits, self.hidden = self.model(inputs, self.hidden)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        self.optimizer.zero_grad()
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()

    def train(self, windows: Iterator[Window], steps: int) -> int:
        """``steps`` steps on the next windows; returns the tokens trained on."""
        tokens = 0
        for _, window in zip(range(steps), windows, strict=False):  # range first: no window is pulled and dropped
            self.step(window.inputs, window.targets)
            tokens += window.inputs.numel()
        return tokens

    def time(self, stream: TokenStream, steps: int, warmup: int) -> tuple[float, int]:
        """Seconds and tokens of ``steps`` training steps after ``warmup`` untimed ones."""
        device = stream.columns.device
        windows = stream.windows(limit=warmup + steps)
        self.train(windows, warmup)
        synchronize(device)
        start = time.perf_counter()
        tokens = self.train(windows, steps)
        synchronize(device)
        return time.perf_counter() - start, tokens

    def time_graphed(self, stream: TokenStream, steps: int, warmup: int) -> tuple[float, int]:
        """As :meth:`time`, with the whole step captured once in a CUDA graph and replayed (PyTorch's
        whole-network recipe: warm-up on a side stream, gradients made inside the graph, the learning
        rate fixed): the fastest a step of these shapes can launch. CUDA only."""
        device = stream.columns.device
        windows = stream.windows(limit=warmup + steps + 1)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.train(windows, max(warmup, 3))
        torch.cuda.current_stream(device).wait_stream(side)
        first = next(windows)
        inputs, targets = first.inputs.clone(), first.targets.clone()
        state = self.hidden
        hidden = tuple(h.detach().clone() for h in state) if isinstance(state, tuple) else state.detach().clone()
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            logits, new_hidden = self.model(inputs, hidden)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
            pairs = zip(hidden, new_hidden, strict=True) if isinstance(hidden, tuple) else [(hidden, new_hidden)]
            for old, new in pairs:
                old.copy_(new.detach())
        synchronize(device)
        start, tokens = time.perf_counter(), 0
        for window in windows:
            if window.inputs.shape != inputs.shape:
                break
            inputs.copy_(window.inputs)
            targets.copy_(window.targets)
            graph.replay()
            tokens += window.inputs.numel()
        synchronize(device)
        return time.perf_counter() - start, tokens
