"""A Kneser-Ney n-gram of the training text as the softmax's teacher while it trains.

At each training position t the softmax learns toward ``(1 - a) onehot(y_t) + a q_t`` instead of the
one-hot alone, where q_t is the interpolated Kneser-Ney distribution after the last order-1 words with
the position's own occurrence left out of the counts (:meth:`KneserNey.score`'s ``leave_one_out``): what
the counts would say of text they have not seen, not a copy of the target. A count model's distribution
as smoothed targets: Xie et al. 2017, "Data noising as smoothing in neural network language models"; as
a teacher: Hinton et al. 2015. The counts only shape training: the loss printed is the model's own
log-likelihood (the teacher changes the gradient only), and the trained model, its checkpoint, its
evaluation and its samples are the plain network's — the counts are not kept.

No (N, V) matrix of soft targets is made. With logits z = h Wᵀ + b, the gradient of the soft target's
cross-entropy w.r.t. z is p - q, and the one-hot's is p - e_y, so the difference is e_y - q: the gradient
of z_y - z·q. z·q = h·(Wᵀq) + b·q needs Wᵀq, one D-vector per position, and q is a sum over the orders
(interpolated Kneser-Ney unrolled from the top order down)::

    q_t = Σ_k m_tk d_k[c_k(t)]  +  r_t e_{y_t}  +  u_t / V

d_k[c] is context c's discounted counts at order k (a sparse row, the same for every position that has
that context: one sparse product per distinct context in the window, ``d_k W``), m_tk the product of the
back-off weights above order k (and the leave-one-out rescaling of the context's total), r_t the
leave-one-out correction of the target's own count, u_t what reaches the uniform floor.
"""

from __future__ import annotations

import warnings

import torch

from lmlab.config.schema import PositiveInt, Probability
from lmlab.errors import ConfigError
from lmlab.models.base import register_model
from lmlab.models.history import HistoryFeatures
from lmlab.models.kneser_ney import KneserNey, check_order
from lmlab.models.pointer import PointerSentinel, PointerTransformerLanguageModel
from lmlab.models.rnn import RNNLanguageModel
from lmlab.models.transformer import TransformerLanguageModel


class SoftTargets:
    """The Kneser-Ney distributions of an ``order`` n-gram of ``tokens``, as products ``Wᵀq`` with any
    (V, ·) matrix W: :meth:`times`."""

    def __init__(self, tokens: torch.Tensor, vocab_size: int, order: int) -> None:
        self.counts = KneserNey(tokens, vocab_size, order)
        self.vocab_size = vocab_size
        # Per order: where each context's entries start in the sorted keys, each entry's word and
        # discounted share of its context (c - D(c)) / c(context .), i.e. the sparse rows d_k.
        self._rows = []
        for table in self.counts.orders:
            starts = torch.searchsorted(table.keys, table.contexts * vocab_size)
            owner = torch.repeat_interleave(
                torch.arange(table.contexts.numel()), starts.diff(append=starts.new_tensor([table.keys.numel()]))
            )
            share = (table.counts - table.discount[table.counts.clamp(max=3)]).clamp_min(0) / table.context_total[owner]
            self._rows.append(
                (torch.cat([starts, starts.new_tensor([table.keys.numel()])]), table.keys % vocab_size, share.float())
            )

    def times(
        self,
        matrix: torch.Tensor,
        history: torch.Tensor,
        targets: torch.Tensor,
        leave_one_out: bool,
        minus_target: bool = False,
    ) -> torch.Tensor:
        """``Wᵀq`` (N, ·) for (N, order-1) histories and (N,) targets (as :meth:`KneserNey.score` takes
        them), W = ``matrix`` (V, ·), differentiable in it; ``Wᵀ(q - e_y)`` with ``minus_target``.

        Two sparse products, so that W's gradient is made once: the rows S W (the distinct contexts of
        every order, each target's own row, the uniform floor), then each position's mix of them, C (S W)."""
        n = targets.numel()
        above = torch.ones(n, dtype=torch.float64)  # the product of the back-off weights above this order
        target_weight = torch.full((n,), -1.0 if minus_target else 0.0, dtype=torch.float64)
        blocks, mix, offset = [], [], 0  # S's rows by order; C's (position, row of S, weight)
        for k, view in reversed(self.counts.order_views(history, targets, leave_one_out)):
            seen = view.seen
            correction = (view.discounted(view.count) - view.discounted(view.raw_count)) / view.total
            target_weight += torch.where(seen, above * correction, 0.0)
            rows = seen.nonzero().squeeze(1)
            contexts, which = torch.unique(view.at[rows], return_inverse=True)
            blocks.append(self._context_rows(k, contexts))
            mix.append((rows, offset + which, (above * view.raw_total / view.total)[rows]))
            offset += contexts.numel()
            above = torch.where(seen, above * view.taken / view.total, above)
        everyone = torch.arange(n)
        ones = torch.ones(n, dtype=torch.float32)
        blocks.append((torch.arange(n + 1), targets.to("cpu", torch.long), ones))  # e_y, one row each
        mix.append((everyone, offset + everyone, target_weight))
        blocks.append(
            (
                torch.tensor([0, self.vocab_size]),
                torch.arange(self.vocab_size),
                ones.new_full((self.vocab_size,), 1 / self.vocab_size),
            )
        )
        mix.append((everyone, torch.full((n,), offset + n), above))
        rows_of_s = _stack_csr(blocks, self.vocab_size).to(matrix.device, matrix.dtype)
        position, row, weight = (torch.cat(part) for part in zip(*mix, strict=True))
        mixing = torch.sparse_coo_tensor(
            torch.stack([position, row]), weight.float(), (n, rows_of_s.size(0)), check_invariants=False
        )
        return mixing.to(matrix.device, matrix.dtype) @ (rows_of_s @ matrix)

    def _context_rows(self, k: int, contexts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """d_k[c] for the given context indices of order k, as CSR (row starts, words, shares)."""
        starts, words, share = self._rows[k - 1]
        first, length = starts[contexts], starts[contexts + 1] - starts[contexts]
        entry = torch.arange(int(length.sum())) - torch.repeat_interleave(length.cumsum(0) - length, length)
        entry += torch.repeat_interleave(first, length)
        return torch.cat([length.new_zeros(1), length.cumsum(0)]), words[entry], share[entry]


def _stack_csr(blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], width: int) -> torch.Tensor:
    """One CSR matrix of the blocks' rows, in order."""
    starts, shift = [blocks[0][0][:1]], 0
    for block_starts, _, _ in blocks:
        starts.append(block_starts[1:] + shift)
        shift += int(block_starts[-1])
    crow = torch.cat(starts)
    columns = torch.cat([b[1] for b in blocks])
    values = torch.cat([b[2] for b in blocks])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": its product with a dense matrix is what is used
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, columns, values, (crow.numel() - 1, width), check_invariants=False)


class NgramTeacher(HistoryFeatures):
    """Mixin: put it before a body whose output is a full softmax (:meth:`~LanguageModel.softmax_layer`)
    and the body's softmax learns, while training, toward ``(1 - teacher_weight)`` of the target +
    ``teacher_weight`` of an order ``teacher_order`` Kneser-Ney model of the training split (leave-one-out).
    With a pointer, put :class:`~lmlab.models.pointer.PointerSentinel` before this: the teacher teaches the
    softmax, and where the pointer explains a target the softmax's gradient, and so the teacher's, is smaller."""

    def __init__(
        self, vocab_size: int, teacher_order: PositiveInt = 4, teacher_weight: Probability = 0.3, **body_arguments
    ) -> None:
        check_order(teacher_order, vocab_size, "model.teacher_order")
        super().__init__(vocab_size, **body_arguments)
        if self.softmax_layer() is None:
            raise ConfigError("a Kneser-Ney teacher needs a full softmax output layer; set model.softmax=full")
        self.teacher_order, self.teacher_weight, self.history_width = teacher_order, teacher_weight, teacher_order - 1
        self._teacher: SoftTargets | None = None  # not in the state dict: the trained model is the network

    def take_corpus(self, train_tokens: torch.Tensor) -> None:
        """Count the training split (for this process's training only; checkpoints do not keep them)."""
        self._teacher = SoftTargets(
            train_tokens.detach().to("cpu", torch.long).flatten(), self.vocab_size, self.teacher_order
        )

    def target_log_probs(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        body, history = self.split_history(features)
        picked = super().target_log_probs(body, targets)
        if not (self.training and torch.is_grad_enabled() and self.teacher_weight and self._teacher is not None):
            return picked
        weight, bias = self.softmax_layer()
        h = self.body_context_vectors(body).reshape(-1, weight.size(1)).float()
        matrix = weight.float() if bias is None else torch.cat([weight.float(), bias.float().unsqueeze(1)], 1)
        if bias is not None:
            h = torch.cat([h, h.new_ones(h.size(0), 1)], 1)
        shift = self._teacher.times(
            matrix, history.reshape(-1, self.history_width), targets.reshape(-1), leave_one_out=True, minus_target=True
        )
        toward = (h * shift).sum(-1).view(targets.shape)  # z·q - z_y
        # The same value; the gradient w.r.t. the logits becomes (1 - a) e_y + a q - p instead of e_y - p.
        return picked + self.teacher_weight * (toward - toward.detach())

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -self.target_log_probs(features, targets).mean()

    def log_probs(self, features: torch.Tensor) -> torch.Tensor:
        return super().log_probs(self.split_history(features)[0])

    @property
    def static_shapes(self) -> bool:
        return False  # the teacher's counts are looked up on the host, by the data


@register_model("taught_pointer_transformer")
class TaughtPointerTransformerLanguageModel(PointerSentinel, NgramTeacher, TransformerLanguageModel):
    """``model=pointer_transformer`` whose softmax a Kneser-Ney n-gram teaches while it trains
    (``model=taught_pointer_transformer``)."""

    _init_query = PointerTransformerLanguageModel._init_query


@register_model("taught_pointer_rnn")
class TaughtPointerRNNLanguageModel(PointerSentinel, NgramTeacher, RNNLanguageModel):
    """``model=pointer_lstm`` whose softmax a Kneser-Ney n-gram teaches while it trains
    (``model=taught_pointer_lstm``)."""
