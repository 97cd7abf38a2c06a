"""The language-model contract and the model registry.

Everything outside ``lmlab/models`` (trainer, evaluation, generation, checkpoints, bench) talks to a
model only through :class:`LanguageModel`; a new architecture is one file with a registered subclass
and one YAML in ``conf/model/`` naming it.

How a model reads a corpus: the data hands out windows of ``T`` time steps over ``B`` independent
columns of text, in order; the ``state`` a model returns for one window is passed to it with the next
window of the same columns (after :meth:`LanguageModel.detach_state`, so gradients stop at the window
edge). For an RNN the state is its hidden state; for a Transformer a cache of past keys/values::

    tokens (T, B) ──▶ forward ──▶ features (T, B, D) ──▶ loss(features, targets)  mean nats/token
    state ──────────▶   │                           └──▶ log_probs(features)     (T, B, vocab)
                        └──▶ next state (same columns, next window)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from lmlab.registry import Registry

State = Any  # None, a tensor, or lists/tuples of them: must survive torch.load(weights_only=True)


class LanguageModel(nn.Module):
    """Base class of every lmlab model: next-token prediction over a fixed vocabulary.

    Subclasses take ``vocab_size`` first, then keyword arguments with plain values (numbers, strings,
    booleans, lists) annotated with their types (see :mod:`lmlab.config.schema`): those annotations validate the
    config group and a checkpoint's stored arguments alike. They must implement :meth:`forward`,
    :meth:`loss` and :meth:`log_probs`. Everything else is an optional capability with a default that says
    "not this model": a pointer's :attr:`context_dim`, :meth:`flops_per_token` (None: the benchmark reports
    no FLOPs), :meth:`regularization`, the CUDA-graph properties, and :class:`ReadsTrainingText`.
    """

    vocab_size: int
    # This module's attributes that are dropout probabilities, for :meth:`scale_dropout`; a submodule with
    # rates of its own (a Transformer block) declares them the same way.
    dropout_rates: tuple[str, ...] = ()

    def scale_dropout(self, factor: float) -> int:
        """Set every dropout probability of the model — the ``dropout_rates`` of each of its modules — to
        ``factor`` × the value it was built with (:class:`lmlab.training.hooks.dropout_budget.DropoutForBudget`).
        Returns how many rates were set: 0 for a model that declares none."""
        count = 0
        for module in self.modules():
            names = getattr(module, "dropout_rates", ())
            if not names:
                continue
            built = module.__dict__.setdefault("_built_dropout", {name: getattr(module, name) for name in names})
            for name, value in built.items():
                setattr(module, name, min(1.0, value * factor))
                count += 1
        return count

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        """The state before the first window of ``batch_size`` columns (None: no state)."""
        return None

    def forward(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens (T, B) and the previous window's state → features (T, B, D) and the next state."""
        raise NotImplementedError

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in nats per token of ``targets`` (T, B) given ``features`` (T, B, D)."""
        raise NotImplementedError

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the vocabulary, shape (..., vocab_size)."""
        raise NotImplementedError

    def target_log_probs(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) per token, shape (T, B), in fp32 or wider. The default picks them out of
        :meth:`log_probs`; a model whose output layer can score only the targets overrides it."""
        return self.log_probs(features).float().gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    # Whether context vectors come out of a normalisation (a LayerNorm: ~1 per feature) rather than a
    # squashing activation (an RNN's tanh: under 1): a head that compares them scales its start to it.
    context_vectors_normalised: bool = False

    @property
    def context_dim(self) -> int:
        """The width D of :meth:`context_vectors` (what a pointer head compares; see
        :mod:`lmlab.models.pointer`). Models that cannot say raise NotImplementedError."""
        raise NotImplementedError

    def context_vectors(self, features: torch.Tensor) -> torch.Tensor:
        """The part of ``features`` (T, B, ·) that describes each position's context, (T, B, D): the keys
        a neural cache compares. The default: the features themselves."""
        return features

    def regularization(self, features: torch.Tensor) -> torch.Tensor | None:
        """A penalty added to the training loss (e.g. AR/TAR), or None for none (the default: then no
        operator is spent adding a zero)."""
        return None

    def flops_per_token(self, train_tokens: torch.Tensor | None = None) -> dict[str, float] | None:
        """Forward FLOPs per token by part, with the total under ``"forward"`` (training counts 3×), or None
        where the model does not say (the default). ``train_tokens`` lets a model whose cost depends on the
        word (adaptive softmax) weigh its parts."""
        return None

    @property
    def static_shapes(self) -> bool:
        """True when a training step's tensor shapes follow from the window's shape alone, as a CUDA
        graph needs; False when they depend on the data (an adaptive softmax picks rows by target word)."""
        return True

    @property
    def static_state(self) -> bool:
        """True when the state keeps :meth:`init_state`'s shapes from window to window (as a CUDA graph
        needs); False when it changes (a KV cache that fills up over the first windows)."""
        return True

    @property
    def sparse_gradients(self) -> bool:
        """True when some parameter gets sparse gradients, which only some optimizers take."""
        return False

    def state_fits(self, state: State, batch_size: int) -> bool:
        """Whether ``state`` (read back from a checkpoint) is one this model can take for ``batch_size``
        columns. The default compares it with :meth:`init_state`: the same nesting, tensors of the same
        shape and dtype. A model whose state grows (a KV cache) overrides it."""

        return same_layout(state, self.init_state(batch_size, "meta"))

    def detach_state(self, state: State) -> State:
        """Cut the graph between windows while keeping the state's values."""
        return map_tensors(state, torch.Tensor.detach)

    @torch.inference_mode()
    def generate(
        self,
        prompt: list[int],
        num_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[int]:
        """Read ``prompt`` (token ids, at least one), then sample ``num_tokens`` ids one at a time,
        each fed back with the state (a Transformer's state is its KV cache, so nothing is recomputed)."""
        self.eval()
        device = next(self.parameters()).device
        features, state = self(torch.tensor(prompt, device=device).view(-1, 1), self.init_state(1, device))
        sampled: list[int] = []
        for _ in range(num_tokens):
            log_probs = self.log_probs(features[-1, 0]).double()
            # Shifted so that the likeliest word is 0 before the division (in float64, where a temperature of
            # 1e-300 is not 0): a tiny temperature then makes the others -inf (greedy), not the softmax NaN.
            logits = (log_probs - log_probs.max()) / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            sampled.append(int(next_id))
            features, state = self(next_id.view(1, 1), state)
        return sampled


@runtime_checkable
class ReadsTrainingText(Protocol):
    """An optional capability: a model that keeps statistics of its training text (the counts of the
    ``ngram`` head, :class:`~lmlab.models.ngram_mixture.NgramMixture`). The runner calls :meth:`take_corpus`
    once, before training (and before a resume's weights are loaded), with the training split's word ids
    (1-D, in order); the model keeps what it needs in its state dict, so that a checkpoint carries it."""

    def take_corpus(self, train_tokens: torch.Tensor) -> None: ...


def diverged(loss: float, vocab_size: int) -> bool:
    """A loss that is not finite, or over 10 × ln(vocabulary) nats per token (a uniform guess costs
    1 × ln(vocabulary)): weights that produce it are not worth keeping or reporting."""
    return not loss < 10 * math.log(max(vocab_size, 2))


def drop_words(embedded: torch.Tensor, tokens: torch.Tensor, p: float, vocab_size: int) -> torch.Tensor:
    """Word-level dropout of gathered embeddings: every occurrence of a dropped word id is zeroed, the
    kept ones scaled by 1/(1-p). Masking the gathered rows (not the whole V×D table, as AWD-LSTM's code
    does) gives the same result without the copy."""
    keep = 1 - p
    word_mask = embedded.new_empty(vocab_size).bernoulli_(keep) / keep
    return embedded * word_mask[tokens].unsqueeze(-1)


def keep_mask(shape: tuple[int, ...] | torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Dropout mask (0 or 1/(1-p)). On CPU, uniform draws compared with p are faster than the per-element
    ``bernoulli_`` that ``F.dropout`` uses (measured in experiments/transformer.md)."""
    mask = torch.rand(shape, device=device).ge_(p).div_(1 - p)
    return mask if mask.dtype == dtype else mask.to(dtype)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)``, with :func:`keep_mask`'s masks on a CPU (one fused kernel elsewhere)."""
    if not (training and p):
        return x
    if x.device.type != "cpu":
        return nn.functional.dropout(x, p, training=True)
    return x * keep_mask(x.shape, p, x.dtype, x.device)


def same_layout(state: State, reference: State) -> bool:
    """Whether ``state`` has the nesting of ``reference``, with tensors of the same shape and dtype."""
    if isinstance(reference, torch.Tensor):
        return isinstance(state, torch.Tensor) and state.shape == reference.shape and state.dtype == reference.dtype
    if isinstance(reference, (list, tuple)):
        return (
            isinstance(state, (list, tuple))
            and len(state) == len(reference)
            and all(map(same_layout, state, reference))
        )
    return state is None and reference is None


def map_tensors(state: State, fn: Callable[[torch.Tensor], torch.Tensor]) -> State:
    """Apply ``fn`` to every tensor of a (nested list/tuple) state."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, (list, tuple)):
        return type(state)(map_tensors(s, fn) for s in state)
    return state


# ------------------------------------------------------------------------------------------ registry
MODELS = Registry("model", "model.name", LanguageModel)
register_model = MODELS.register  # class decorator: make a LanguageModel buildable as model.name: <name>
