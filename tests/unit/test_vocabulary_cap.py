"""dataset.max_vocab / dataset.min_freq: rarer train words become <unk> in every split (#21)."""

import pytest

from lmlab.data import LanguageModelData
from lmlab.errors import ConfigError


def _folder(tmp_path):
    # train counts: the 5, a 5, cat 4, dog 3, <eos> 3 (one per line), emu 2, yak 1, gnu 1
    (tmp_path / "train.txt").write_text("the the a a cat cat dog emu yak\nthe the a a cat dog emu\nthe a cat dog gnu\n")
    (tmp_path / "valid.txt").write_text("the yak gnu cat owl\n")
    (tmp_path / "test.txt").write_text("emu a dog\n")
    return tmp_path


def _text(data, split):
    return " ".join(data.vocab.words[i] for i in getattr(data.corpus, split).tolist())


def test_no_cap_keeps_every_train_word(tmp_path):
    data = LanguageModelData(_folder(tmp_path), batch_size=1, eval_batch_size=1, bptt=1, cache=False)
    assert data.vocab.words == ["the", "a", "cat", "dog", "<eos>", "emu", "yak", "gnu", "<unk>"]


def test_min_freq_and_max_vocab_turn_rare_words_into_unk_everywhere(tmp_path):
    folder = _folder(tmp_path)
    by_count = LanguageModelData(folder, batch_size=1, eval_batch_size=1, bptt=1, cache=False, min_freq=2)
    # yak and gnu (once each) join <unk>, whose count (2) ties emu's and keeps its place after it
    assert by_count.vocab.words == ["the", "a", "cat", "dog", "<eos>", "emu", "<unk>"]
    assert _text(by_count, "valid") == "the <unk> <unk> cat <unk> <eos>"
    assert _text(by_count, "train").split().count("<unk>") == 2
    top = LanguageModelData(folder, batch_size=1, eval_batch_size=1, bptt=1, cache=False, max_vocab=5)
    # the, a, cat + the two that always stay; dog (3), emu (2), yak, gnu -> <unk>, now the most frequent (7)
    assert top.vocab.words == ["<unk>", "the", "a", "cat", "<eos>"]
    assert _text(top, "test") == "<unk> a <unk> <eos>"
    assert len(top.corpus.train) == len(by_count.corpus.train)  # the same tokens, fewer word types


def test_a_cap_below_three_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.max_vocab=2 leaves no word besides <unk> and <eos>"):
        LanguageModelData(_folder(tmp_path), batch_size=1, eval_batch_size=1, bptt=1, cache=False, max_vocab=2)
