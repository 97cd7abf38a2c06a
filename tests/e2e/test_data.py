import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import write_corpus

from lmlab.data.batching import TokenStream, batchify
from lmlab.data.corpus import PIECE_BYTES, SPLITS, read_pieces, tokenize
from lmlab.data.datasets import EOS, UNK, Corpus, LanguageModelData
from lmlab.errors import ConfigError, DataError
from tests.commands import lmlab


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


def test_text_dir_checks_sizes_and_caches(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(tmp_path / "cache"))
    data = LanguageModelData(corpus_dir, batch_size=4, eval_batch_size=4, bptt=8)
    assert len(list((tmp_path / "cache").glob(".lmlab-cache-*.pt"))) == 1
    assert sorted(p.name for p in corpus_dir.iterdir()) == ["test.txt", "train.txt", "valid.txt"]  # the user's
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


def test_official_wikitext2_token_counts(shared_data):
    for name, expected in (("wiki.valid.tokens", 217_646), ("wiki.test.tokens", 245_569)):
        assert sum(len(words) for words in read_pieces(shared_data / "wikitext-2" / name)) == expected


def _reference_corpus(texts: dict[str, str]) -> tuple[list[str], dict[str, list[int]]]:
    """The corpus rules written the slow, obvious way (one Python step per word)."""

    def words_of(text):
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        return [w for line in lines for w in [*line.split(), EOS]]

    counts = Counter(words_of(texts["train"]))
    counts.setdefault(UNK, 0)
    counts.setdefault(EOS, 0)
    vocab = [w for w, _ in counts.most_common()]
    index = {w: i for i, w in enumerate(vocab)}
    return vocab, {s: [index.get(w, index[UNK]) for w in words_of(t)] for s, t in texts.items()}


@pytest.mark.parametrize("piece_bytes", [7, 64, None])
def test_fast_tokeniser_equals_the_obvious_one(tmp_path, monkeypatch, piece_bytes):
    """Pieces cut anywhere (7 bytes: mid-line, mid-way through multi-byte characters' neighbours),
    blank lines, Unicode whitespace, ties in frequency, no final newline, <unk> absent from train."""
    rng = random.Random(0)
    pool = ["the", "cat", "Ünïcode", "日本", "a\u00a0b", "x\u2028y", "tab\tbed", "cr\r", "f\x0cf", "<eos>", ""]
    texts = {
        s: "\n".join(" ".join(rng.choice(pool) for _ in range(rng.randint(0, 9))) for _ in range(n)) + end
        for s, n, end in (("train", 300, ""), ("valid", 50, "\n"), ("test", 40, " tail"))
    }
    texts["valid"] += "never seen in train\n"
    for split, text in texts.items():
        (tmp_path / f"{split}.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr("lmlab.data.corpus.PIECE_BYTES", piece_bytes or PIECE_BYTES)
    corpus = Corpus.from_files({s: tmp_path / f"{s}.txt" for s in SPLITS}, cache=False)
    vocab, ids = _reference_corpus(texts)
    assert corpus.vocab.words == vocab
    for split in SPLITS:
        assert getattr(corpus, split).tolist() == ids[split], split
        assert getattr(corpus, split).dtype == torch.int32
    assert tokenize(texts["valid"], corpus.vocab).tolist() == ids["valid"]


def test_cache_is_memory_mapped_and_lives_in_the_cache_folder_never_beside_the_data(tmp_path, monkeypatch):
    data = write_corpus(tmp_path / "data")
    files = {s: data / f"{s}.txt" for s in SPLITS}
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(tmp_path / "cache"))
    first = Corpus.from_files(files)
    assert sorted(p.name for p in data.iterdir()) == ["test.txt", "train.txt", "valid.txt"]  # nothing beside the data
    cached = list((tmp_path / "cache").glob(".lmlab-cache-*.pt"))
    assert len(cached) == 1
    second = Corpus.from_files(files)
    assert second.vocab.words == first.vocab.words and torch.equal(second.train, first.train)
    assert _mapped_from(second.train) == str(cached[0])  # memory-mapped, not read into RAM


def _mapped_from(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds the tensor's memory (from /proc/self/maps), if any."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) == 6 else None
    return None


# Reads the three files in ``sys.argv[1]`` in 1 MB pieces, in a process of its own (a test worker's peak
# memory is whatever an earlier test left it at); prints how much the peak grew, in MB, and the tokens read.
READ_IN_PIECES = """
import json, resource, sys
from pathlib import Path

from lmlab.data import corpus

corpus.PIECE_BYTES = 1 << 20
folder = Path(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
read = corpus.Corpus.from_files({s: folder / f"{s}.txt" for s in ("train", "valid", "test")}, cache=False)
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"grown_mb": grown_mb, "train": len(read.train), "valid": read.vocab.decode(read.valid.tolist())}))
"""


def test_a_30_mb_single_line_is_read_in_bounded_pieces(tmp_path):
    words = [f"w{i}" for i in range(50)]
    line = (" ".join(words) + " ") * (30 * 2**20 // len(" ".join(words) + " "))  # ~30 MB, no newline
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text(line)
    (data / "valid.txt").write_text("w1 w2 unseen\n")
    (data / "test.txt").write_text("w3\n")
    (tmp_path / "read_in_pieces.py").write_text(READ_IN_PIECES)
    done = lmlab("read_in_pieces", str(data), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    read = json.loads(done.stdout)
    assert read["train"] == len(line.split()) + 1  # one <eos> for the one line
    assert read["valid"] == ["w1", "w2", UNK, EOS]
    # the ids (4 bytes a word) and one piece's words: ~80 MB; splitting the whole line at once: ~630 MB
    assert read["grown_mb"] < 300


def test_rank_shards_together_read_exactly_the_full_batch(monkeypatch):
    from lmlab.runtime import distributed

    stream = TokenStream(torch.arange(203, dtype=torch.int32), batch_size=6, bptt=4)
    shards = [stream.shard(rank, 3) for rank in range(3)]
    assert [s.batch_size for s in shards] == [2, 2, 2] and stream.batch_size == 6  # the full stream is untouched
    for whole, *parts in zip(stream.windows(), *(s.windows() for s in shards), strict=True):
        assert torch.equal(torch.cat([p.inputs for p in parts], 1), whole.inputs)
        assert torch.equal(torch.cat([p.targets for p in parts], 1), whole.targets)
        assert whole.inputs.dtype == torch.long  # int32 storage, int64 windows
    monkeypatch.setattr(distributed, "place", lambda: distributed.Place(0, 4))
    with pytest.raises(ConfigError, match=r"dataset.batch_size=6 does not split over 4 processes.*=8 or 4"):
        distributed.check_divisible(6, "dataset.batch_size")
