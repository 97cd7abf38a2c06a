"""Word-level corpora: the vocabulary, the three splits as token ids, and their memory-mapped cache.

A corpus is counted the way the language-modelling literature counts it: every line is split on
whitespace and closed with one ``<eos>``; the vocabulary comes from the train split alone, sorted by
descending frequency (adaptive softmax relies on that order; ties keep first-seen order), and words
unseen in train become ``<unk>``.

Tokenising runs without a Python statement per word, so a 100 M-token corpus takes seconds, not
minutes: a file is read in pieces of ~16 MB cut after a newline (or a space, for an endless line),
``\\n`` becomes `` <eos> `` and ``str.split`` cuts the words; ids come from a C-level ``map`` over a
dict. Train ids are first numbered in order of first appearance (a dict whose ``__missing__`` hands
out the next number — Python runs only once per *new* word), counted with ``bincount`` and renumbered
by frequency with one tensor gather. Memory: the ids (4 bytes each) plus one piece's words.

The ids are cached as int32 tensors in ``.lmlab-cache-<source>-<version>.pt`` in lmlab's cache folder
(:func:`cache_dir`; never beside the data, which is the user's) and loaded memory-mapped: a second run starts in
well under a second and shares the pages with every other process reading the same corpus.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import torch

from lmlab.errors import DataError
from lmlab.runtime.files import atomic_save, remove_stale_temp_files

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
_CACHE_VERSION = 2  # 2: int32 ids, memory-mapped
PIECE_BYTES = 16 << 20


class Vocabulary:
    """Maps words to ids and back; id order is by descending train frequency."""

    def __init__(self, words: list[str]) -> None:
        if len(set(words)) != len(words):
            raise DataError("vocabulary has duplicate words")
        self.words = list(words)
        self.index = {word: i for i, word in enumerate(self.words)}
        if UNK not in self.index or EOS not in self.index:
            raise DataError(f"vocabulary must contain {UNK} and {EOS}")
        self.unk_id = self.index[UNK]
        self.eos_id = self.index[EOS]

    def __len__(self) -> int:
        return len(self.words)

    def ids(self, words: Iterable[str]) -> Iterator[int]:
        """Each word's id (``<unk>``'s for words not in the vocabulary), mapped in C: no Python step per word."""
        return map(self.index.get, words, repeat(self.unk_id))

    def encode(self, words: list[str]) -> list[int]:
        return list(self.ids(words))

    def decode(self, ids: list[int]) -> list[str]:
        return [self.words[i] for i in ids]


def read_pieces(path: Path, piece_bytes: int | None = None) -> Iterator[list[str]]:
    """The words of a UTF-8 file, ``<eos>`` closing every line (also a last one without a newline),
    in pieces of about ``piece_bytes``; names the file and byte offset of any bytes that are not UTF-8."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    offset, rest, last = 0, b"", b"\n"
    with open(path, "rb") as f:
        while True:
            block = f.read(piece_bytes or PIECE_BYTES)
            data = rest + block
            if not data:
                break
            # Cut after the last newline (else the last space) so no word or UTF-8 sequence is split.
            cut = len(data) if not block else max(data.rfind(b"\n"), data.rfind(b" ")) + 1
            if cut == 0:  # one giant word so far: read on
                rest = data
                continue
            piece, rest = data[:cut], data[cut:]
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path} is not UTF-8 text (bad byte at offset {offset + err.start}); "
                    "re-encode it, e.g. `iconv -f latin1 -t utf-8 FILE`"
                ) from None
            offset, last = offset + len(piece), piece[-1:]
            yield _words(text)
    if last != b"\n":  # the last line had no newline: it still ends with <eos>
        yield [EOS]


def tokenize(text: str, vocab: Vocabulary) -> torch.Tensor:
    """``text`` as int32 ids of ``vocab`` (unknown words: ``<unk>``), each line closed by ``<eos>``."""
    words = _words(text)
    if text and not text.endswith("\n"):
        words.append(EOS)
    return _as_tensor(array("i", vocab.ids(words)))


def _words(text: str) -> list[str]:
    """Whitespace-separated words, each newline becoming ``<eos>`` (the line rule, applied in C)."""
    return text.replace("\n", f" {EOS} ").split()


def encode_file(path: Path, vocab: Vocabulary, piece_bytes: int | None = None) -> torch.Tensor:
    """A file's int32 ids of ``vocab`` (unknown words: ``<unk>``)."""
    ids = array("i")
    for words in read_pieces(path, piece_bytes):
        ids.extend(vocab.ids(words))
    return _as_tensor(ids)


class _FirstSeen(dict):
    """word -> id in order of first appearance; only a new word runs Python code."""

    def __missing__(self, word: str) -> int:
        self[word] = len(self)
        return self[word]


def build_vocabulary(path: Path, piece_bytes: int | None = None) -> tuple[Vocabulary, torch.Tensor]:
    """The train split's vocabulary (by descending frequency) and its ids, in one pass over the file."""
    first_seen, ids = _FirstSeen(), array("i")
    for words in read_pieces(path, piece_bytes):
        ids.extend(map(first_seen.__getitem__, words))
    for special in (UNK, EOS):  # absent from the text: last, with count 0 (as Counter.most_common puts them)
        first_seen[special]  # noqa: B018 - __missing__ adds it
    first_ids = _as_tensor(ids)
    counts = torch.bincount(first_ids, minlength=len(first_seen))
    order = torch.sort(-counts, stable=True).indices  # by count, ties in first-seen order
    rank = torch.empty(len(order), dtype=torch.int32)
    rank[order] = torch.arange(len(order), dtype=torch.int32)
    words = list(first_seen)
    for start in range(0, len(first_ids), PIECE_BYTES):  # renumber in place, a slice at a time
        piece = first_ids[start : start + PIECE_BYTES]
        piece.copy_(torch.index_select(rank, 0, piece))
    return Vocabulary([words[i] for i in order.tolist()]), first_ids


def _as_tensor(ids: array) -> torch.Tensor:
    return torch.frombuffer(ids, dtype=torch.int32) if len(ids) else torch.zeros(0, dtype=torch.int32)


def cache_dir() -> Path:
    """Where corpus caches go: ``$LMLAB_CACHE_DIR``, else the user's cache folder (``~/.cache/lmlab/corpora`` on
    Linux)."""
    env = os.environ.get("LMLAB_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("lmlab")) / "corpora"


@dataclass
class Corpus:
    """The three splits as 1-D int32 token-id tensors plus the train vocabulary."""

    vocab: Vocabulary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    @classmethod
    def from_files(cls, files: dict[str, Path], cache: bool = True) -> Corpus:
        """Build from ``{"train": path, "valid": path, "test": path}``, using the cache if present."""
        path = cache_dir() / _cache_name(files)
        if cache:
            with contextlib.suppress(OSError):  # a cache folder that cannot be written keeps what it has
                remove_stale_temp_files(path.parent)  # a killed cache write's leftovers
            loaded = _load_cache(path)
            if loaded is not None:
                return loaded
        vocab, train = build_vocabulary(Path(files["train"]))
        corpus = cls(vocab, train, *(encode_file(Path(files[s]), vocab) for s in SPLITS[1:]))
        for split in SPLITS:
            if len(getattr(corpus, split)) < 2:
                raise DataError(f"{files[split]} is empty: a split needs at least one word")
        if cache:
            state = {"words": vocab.words, **{s: getattr(corpus, s) for s in SPLITS}}
            with contextlib.suppress(OSError):  # cannot be written: the next run tokenises again
                _write_cache(path, state)
        return corpus

    def capped(self, max_vocab: int | None = None, min_freq: int = 1) -> Corpus:
        """The corpus with a smaller vocabulary, as WikiText and torchtext's ``build_vocab`` make one:
        train words seen fewer than ``min_freq`` times, and all but the ``max_vocab`` most frequent
        (``<unk>`` and ``<eos>`` included, and always kept), become ``<unk>`` in every split. The order
        stays by descending train frequency, ``<unk>`` counted with the words it absorbed. ``self``
        when nothing is dropped."""
        if max_vocab is None and min_freq <= 1:
            return self
        counts = torch.bincount(self.train, minlength=len(self.vocab))  # ids are in frequency order
        keep = counts >= min_freq
        keep[[self.vocab.unk_id, self.vocab.eos_id]] = True
        if max_vocab is not None and int(keep.sum()) > max_vocab:
            kept = keep.nonzero().squeeze(1)
            others = kept[(kept != self.vocab.unk_id) & (kept != self.vocab.eos_id)]
            keep[others[max_vocab - 2 :]] = False  # the least frequent of the kept words go
        if bool(keep.all()):
            return self
        counts[self.vocab.unk_id] += counts[~keep].sum()
        kept = keep.nonzero().squeeze(1)
        kept = kept[torch.sort(-counts[kept], stable=True).indices]  # unk moves up to its new rank
        new_id = torch.full((len(self.vocab),), -1, dtype=torch.int32)
        new_id[kept] = torch.arange(len(kept), dtype=torch.int32)
        new_id[~keep] = new_id[self.vocab.unk_id]
        vocab = Vocabulary([self.vocab.words[i] for i in kept.tolist()])
        return Corpus(vocab, *(new_id[getattr(self, split).long()] for split in SPLITS))


def _load_cache(path: Path) -> Corpus | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, mmap=True, weights_only=True)
        return Corpus(Vocabulary(state["words"]), *(state[s] for s in SPLITS))
    except Exception:  # a stale or damaged cache is rebuilt, never trusted
        return None


def _cache_name(files: dict[str, Path]) -> str:
    """``.lmlab-cache-<source>-<version>.pt``: <source> names the three files' paths, <version> their
    sizes and mtimes (and the cache format)."""
    source, version = hashlib.sha1(), hashlib.sha1(str(_CACHE_VERSION).encode())
    for split in SPLITS:
        path = Path(files[split]).resolve()
        stat = path.stat() if path.exists() else None
        source.update(str(path).encode())
        version.update(f"{stat and stat.st_size}|{stat and stat.st_mtime_ns}".encode())
    return f".lmlab-cache-{source.hexdigest()[:10]}-{version.hexdigest()[:10]}.pt"


def _write_cache(path: Path, state: dict) -> None:
    """Write the cache atomically, then remove older caches of the same source."""
    atomic_save(state, path)
    source_prefix = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{source_prefix}-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
