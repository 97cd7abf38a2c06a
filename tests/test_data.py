import os
from pathlib import Path

import pytest
import torch

from lmlab.batching import TokenStream, batchify
from lmlab.data import EOS, UNK, Corpus, LanguageModelData
from lmlab.errors import ConfigError, DataError

SHARED_WT2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"


def _corpus(tmp_path: Path, train: str, valid: str, test: str) -> Corpus:
    files = {}
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text(text)
    return Corpus.from_files(files, cache=False)


def test_vocabulary_unk_and_eos_counting(tmp_path):
    corpus = _corpus(tmp_path, "a b a\nc a\n", "a z\n", "b\n\n")
    vocab = corpus.vocab
    assert vocab.words[0] == "a"  # most frequent first
    assert set(vocab.words) == {"a", "b", "c", EOS, UNK}
    assert len(corpus.train) == 7  # 3 + <eos> + 2 + <eos>
    assert vocab.decode(corpus.valid.tolist()) == ["a", UNK, EOS]  # z is unseen in train
    assert vocab.decode(corpus.test.tolist()) == ["b", EOS, EOS]  # an empty line still ends with <eos>


def test_last_line_without_newline_counts(tmp_path):
    corpus = _corpus(tmp_path, "a b\nc d", "a\n", "a\n")
    assert len(corpus.train) == 6


def test_batchify_and_bptt_targets_are_shifted_inputs_across_windows():
    data = torch.arange(43)
    columns = batchify(data, 4)  # 10 steps per column, the 3 leftover tokens dropped
    assert columns.shape == (10, 4)
    assert columns[:, 1].tolist() == list(range(10, 20))  # each column is a contiguous stretch
    assert columns.data_ptr() == data.data_ptr()  # a view: the train split is not held twice
    stream = TokenStream(data, batch_size=4, bptt=4)
    windows = list(stream.windows())
    assert [len(w.inputs) for w in windows] == [4, 4, 1]  # 9 (input, target) pairs per column
    assert stream.num_windows() == 3 and stream.num_windows(limit=2) == 2 and stream.num_tokens == 36
    assert len(list(stream.windows(limit=2))) == 2
    inputs = torch.cat([w.inputs for w in windows])
    targets = torch.cat([w.targets for w in windows])
    assert torch.equal(targets[:-1], inputs[1:])  # target = next input, also across window boundaries
    assert torch.equal(targets, columns[1:])


def test_text_dir_checks_sizes_and_caches(corpus_dir):
    data = LanguageModelData(corpus_dir, batch_size=4, eval_batch_size=4, bptt=8)
    assert len(list(corpus_dir.glob(".lmlab-cache-*.pt"))) == 1
    again = LanguageModelData(corpus_dir, batch_size=4, eval_batch_size=4, bptt=8)
    assert again.vocab.words == data.vocab.words and torch.equal(again.corpus.train, data.corpus.train)
    with pytest.raises(ConfigError, match=r"dataset.bptt=5000 is longer than the data"):
        LanguageModelData(corpus_dir, batch_size=4, bptt=5000)
    with pytest.raises(ConfigError, match=r"dataset.batch_size=100000 is too large"):
        LanguageModelData(corpus_dir, batch_size=100000)


def test_bad_data_is_named(tmp_path, corpus_dir):
    with pytest.raises(ConfigError, match="dataset.path is not set"):
        LanguageModelData(None)
    with pytest.raises(ConfigError, match="is not a folder"):
        LanguageModelData(tmp_path / "nope")
    (corpus_dir / "valid.txt").write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(DataError, match=r"valid.txt is not UTF-8 text \(bad byte at offset 3\)"):
        LanguageModelData(corpus_dir, cache=False)
    (corpus_dir / "valid.txt").write_text("")
    with pytest.raises(DataError, match="valid.txt is empty"):
        LanguageModelData(corpus_dir, cache=False)
    (corpus_dir / "test.txt").unlink()
    with pytest.raises(DataError, match="missing data files: .*test.txt"):
        LanguageModelData(corpus_dir, cache=False)


@pytest.mark.skipif(not SHARED_WT2.is_dir() and "LMLAB_DATA_DIR" not in os.environ, reason="no WikiText-2 here")
def test_official_wikitext2_token_counts():
    folder = Path(os.environ.get("LMLAB_DATA_DIR", SHARED_WT2.parent)) / "wikitext-2"
    if not (folder / "wiki.valid.tokens").is_file():
        pytest.skip("WikiText-2 valid/test files not present")
    from lmlab.data import iter_lines, read_text

    for name, expected in (("wiki.valid.tokens", 217_646), ("wiki.test.tokens", 245_569)):
        assert sum(len(words) for words in iter_lines(read_text(folder / name))) == expected


def test_a_100_mb_single_line_is_read_in_bounded_pieces(tmp_path):
    import resource

    words = [f"w{i}" for i in range(50)]
    line = (" ".join(words) + " ") * (100 * 2**20 // len(" ".join(words) + " "))  # ~100 MB, no newline
    (tmp_path / "train.txt").write_text(line)
    (tmp_path / "valid.txt").write_text("w1 w2 unseen\n")
    (tmp_path / "test.txt").write_text("w3\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    corpus = Corpus.from_files({s: tmp_path / f"{s}.txt" for s in ("train", "valid", "test")}, cache=False)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(corpus.train) == len(line.split()) + 1  # one <eos> for the one line
    assert corpus.vocab.decode(corpus.valid.tolist()) == ["w1", "w2", UNK, EOS]
    assert grown_mb < 1000  # splitting the whole line at once would need ~1.5 GB of Python strings
