"""The Kneser-Ney n-gram behind method=ngram: the same probabilities as a plain per-word implementation of
Chen & Goodman's formulas, a distribution over the vocabulary after any history, windows scored in the
order evaluation hands them out, and an order too high for 64-bit keys refused in one line."""

from collections import defaultdict

import pytest
import torch

from lmlab.data.kneser_ney import KneserNey, discounts, max_order
from lmlab.errors import ConfigError

V = 40


def _corpus(n: int = 3000, seed: int = 0) -> torch.Tensor:
    # a Markov-ish text: frequent words, repeated phrases and a long tail, so every order has counts of 1..4+
    g = torch.Generator().manual_seed(seed)
    words = [int(w) for w in torch.randint(0, V, (n,), generator=g) % (torch.randint(3, V, (n,), generator=g))]
    for i in range(0, n - 6, 37):
        words[i : i + 4] = [1, 2, 3, 4]
    return torch.tensor(words)


def _reference(tokens: list[int], order: int, left_out: tuple[int, ...] = (), fixed_discounts=None):
    """p(w | history) by the textbook formulas, one dict lookup at a time; ``left_out``: one occurrence of
    that n-gram taken out of the text's counts (each of its endings once), with ``fixed_discounts``."""
    raw = defaultdict(int)
    for k in range(1, order + 1):
        for i in range(len(tokens) - k + 1):
            raw[tuple(tokens[i : i + k])] += 1
    for j in range(1, len(left_out) + 1):
        raw[left_out[-j:]] -= 1
        if raw[left_out[-j:]] == 0:
            del raw[left_out[-j:]]
    table = [None] + [defaultdict(int) for _ in range(order)]
    for gram, c in raw.items():
        if len(gram) == order:
            table[order][gram] = c
        if len(gram) >= 2:
            table[len(gram) - 1][gram[1:]] += 1  # one more distinct word before gram[1:]
    stats = []
    for k in range(1, order + 1):
        d = fixed_discounts[k - 1] if fixed_discounts else discounts(torch.tensor(list(table[k].values()))).tolist()
        total, taken = defaultdict(float), defaultdict(float)
        for gram, c in table[k].items():
            total[gram[:-1]] += c
            taken[gram[:-1]] += d[min(c, 3)]
        stats.append((d, total, taken))

    def prob(history: list[int], w: int) -> float:
        p = 1.0 / V
        for k in range(1, order + 1):
            if len(history) < k - 1:
                break
            context = tuple(history[len(history) - (k - 1) :]) if k > 1 else ()
            d, total, taken = stats[k - 1]
            if total.get(context, 0) == 0:
                continue
            c = table[k].get(context + (w,), 0)
            p = max(c - d[min(c, 3)], 0) / total[context] + taken[context] / total[context] * p
        return p

    return prob


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_probabilities_are_the_textbook_formulas_and_sum_to_one(order):
    tokens = _corpus()
    model, reference = KneserNey(tokens, V, order), _reference(tokens.tolist(), order)
    held_out = _corpus(400, seed=1)
    histories = [held_out[max(0, i - order + 1) : i].tolist() for i in range(1, 400)]
    padded = torch.tensor([[-1] * (order - 1 - len(h)) + h for h in histories]).view(len(histories), order - 1)
    got = model.probs(padded, held_out[1:400])
    want = torch.tensor(
        [reference(h, int(w)) for h, w in zip(histories, held_out[1:400], strict=True)], dtype=torch.float64
    )
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    for history in padded[::40]:  # after any history, seen or not, short or full: a distribution
        assert model.probs(history.repeat(V, 1), torch.arange(V)).sum().item() == pytest.approx(1.0, abs=1e-12)


def test_leave_one_out_scores_each_occurrence_as_if_the_text_had_not_held_it():
    order, tokens = 3, _corpus(1200)
    model = KneserNey(tokens, V, order)
    fixed = [table.discount.tolist() for table in model.orders]
    positions = list(range(2, 1200, 7)) + [2]
    history = torch.stack([tokens[i - 2 : i] for i in positions])
    got, _ = model.score(history, tokens[positions], leave_one_out=True)
    for row, i in enumerate(positions):
        gram = tuple(tokens[i - 2 : i + 1].tolist())
        want = _reference(tokens.tolist(), order, left_out=gram, fixed_discounts=fixed)(list(gram[:2]), gram[2])
        assert got[row].item() == pytest.approx(want, rel=1e-12), (i, gram)
    # a phrase seen once is, without itself, unseen: below its full-count probability, matched shorter
    once = [i for i in positions if model._raw_counts(3)[1][torch.searchsorted(model._raw_counts(3)[0], int(
        (tokens[i - 2] * V + tokens[i - 1]) * V + tokens[i]))] == 1]  # fmt: skip
    assert once
    full, full_matched = model.score(history, tokens[positions])
    loo, loo_matched = model.score(history, tokens[positions], leave_one_out=True)
    assert bool((loo <= full).all()) and bool((loo < full).any())
    assert bool((loo_matched <= full_matched).all())


def test_the_distribution_after_a_history_is_every_word_scored():
    model = KneserNey(_corpus(), V, 4)
    history = torch.tensor([[-1, -1, -1], [-1, -1, 2], [1, 2, 3], [39, 39, 39], [5, 1, 2], [-1, 3, 4]])
    dense, matched = model.distribution(history)
    assert dense.shape == (6, V) and torch.allclose(dense.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-12)
    for row in range(6):
        p, m = model.score(history[row].repeat(V, 1), torch.arange(V))
        assert torch.allclose(dense[row], p, rtol=1e-12, atol=0) and bool((m == matched[row]).all())
    assert matched.tolist()[:3] == [0, 1, 3]


@pytest.mark.parametrize("length", [0, 1, 2])
def test_a_text_too_short_for_the_order_scores_what_it_can(length):
    model, history = KneserNey(torch.arange(length), V, 3), torch.tensor([[-1, -1], [0, 1], [5, 6]])
    for leave_one_out in (False, True):
        p, matched = model.score(history, torch.tensor([1, 2, 3]), leave_one_out)
        assert bool((p > 0).all()) and matched.max().item() <= max(length - 1, 0)
    dense, _ = model.distribution(history)
    assert torch.allclose(dense.sum(1), torch.ones(3, dtype=torch.float64))
    if length == 0:  # no text: every word 1/V
        assert torch.allclose(dense, torch.full((3, V), 1.0 / V, dtype=torch.float64))


def test_an_unseen_context_backs_off_and_a_seen_phrase_is_likely():
    model = KneserNey(_corpus(), V, 3)
    seen, unseen = model.probs(torch.tensor([[2, 3], [39, 39]]), torch.tensor([4, 4]))
    assert seen > 0.8  # "1 2 3 4" recurs: after "2 3" comes 4
    assert unseen < seen and unseen == pytest.approx(model.probs(torch.tensor([[-1, -1]]), torch.tensor([4])).item())


def test_column_probs_follow_the_columns_row_by_row():
    model, tokens = KneserNey(_corpus(), V, 3), _corpus(200, seed=2)
    columns = tokens[:198].view(2, 99).t()  # as batchify cuts them: (steps, batch)
    got = model.column_probs(columns, rows=50)  # e.g. the first windows of a limited evaluation
    for row in (1, 2, 30, 50):
        for b in range(2):
            history = columns[max(0, row - 2) : row, b].tolist()
            history = torch.tensor([[-1] * (2 - len(history)) + history])
            assert got[(row - 1) * 2 + b] == model.probs(history, columns[row, b : b + 1]).item()
    assert got.numel() == 100


def test_an_order_too_high_for_the_vocabulary_is_refused_in_one_line():
    assert max_order(33_278) == 4 and max_order(267_735) == 3
    with pytest.raises(
        ConfigError, match=r"^ngram.order=5 is too high for a 33,278-word vocabulary .* ngram.order=4 or less$"
    ):
        KneserNey(torch.zeros(10, dtype=torch.long), 33_278, 5)
