"""Word-level corpora: vocabulary, tokenised splits (cached), and the splits as window streams.

A corpus is counted the way the language-modelling literature counts it: every line is split on
whitespace and closed with one ``<eos>``; the vocabulary comes from the train split alone, sorted by
frequency (adaptive softmax relies on that order), and words unseen in train become ``<unk>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.batching import TokenStream
from lmlab.download import WIKITEXT2_FILES, ensure_wikitext2
from lmlab.errors import ConfigError, DataError
from lmlab.files import atomic_save, remove_stale_temp_files
from lmlab.schema import PositiveInt, check_arguments

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
_CACHE_VERSION = 1
_PIECE_CHARS = 1 << 20


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

    @classmethod
    def from_counts(cls, counts: Counter[str]) -> Vocabulary:
        counts = Counter(counts)
        counts.setdefault(UNK, 0)
        counts.setdefault(EOS, 0)
        # Counter.most_common keeps first-seen order among equal counts, so the result is stable.
        return cls([word for word, _ in counts.most_common()])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, words: list[str]) -> list[int]:
        return [self.index.get(word, self.unk_id) for word in words]

    def decode(self, ids: list[int]) -> list[str]:
        return [self.words[i] for i in ids]


def read_text(path: Path) -> str:
    """Read a whole data file as UTF-8, naming the file and byte offset when it is not."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (bad byte at offset {err.start}); "
            "re-encode it, e.g. `iconv -f latin1 -t utf-8 FILE`"
        ) from err


def iter_lines(text: str) -> Iterator[list[str]]:
    """Yield each line's words plus ``<eos>``; a last line without a newline still counts.

    A very long line (say a 100 MB file with no newline) comes in pieces of about 1 MB, cut at spaces,
    with ``<eos>`` after the last piece, so memory stays bounded by the piece, not the line.
    """
    # str.splitlines() would also break on form feeds and Unicode separators; the field splits on \n.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    for line in lines:
        start = 0
        while len(line) - start > _PIECE_CHARS:
            cut = line.find(" ", start + _PIECE_CHARS)
            if cut < 0:
                break
            yield line[start:cut].split()
            start = cut
        yield line[start:].split() + [EOS]


def tokenize(text: str, vocab: Vocabulary) -> torch.Tensor:
    ids = array("q")
    for words in iter_lines(text):
        ids.extend(vocab.encode(words))
    return torch.frombuffer(ids, dtype=torch.long).clone() if ids else torch.zeros(0, dtype=torch.long)


@dataclass
class Corpus:
    """The three splits as 1-D token-id tensors plus the train vocabulary."""

    vocab: Vocabulary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    @classmethod
    def from_files(cls, files: dict[str, Path], cache: bool = True) -> Corpus:
        """Build from ``{"train": path, "valid": path, "test": path}``, using a tensor cache if present."""
        cache_path = _cache_path(files)
        if cache:
            with contextlib.suppress(OSError):  # a read-only data folder keeps what it has
                remove_stale_temp_files(cache_path.parent)  # a killed cache write's leftovers
        if cache and cache_path.is_file():
            try:
                state = torch.load(cache_path, weights_only=True)
                return cls(Vocabulary(state["words"]), *(state[s] for s in SPLITS))
            except Exception:  # a stale or damaged cache is rebuilt, never trusted
                pass
        texts = {split: read_text(Path(files[split])) for split in SPLITS}
        counts: Counter[str] = Counter()
        for words in iter_lines(texts["train"]):
            counts.update(words)
        vocab = Vocabulary.from_counts(counts)
        corpus = cls(vocab, *(tokenize(texts[s], vocab) for s in SPLITS))
        for split in SPLITS:
            if len(getattr(corpus, split)) < 2:
                raise DataError(f"{files[split]} is empty: a split needs at least one word")
        if cache:
            try:
                _write_cache(cache_path, {"words": vocab.words, **{s: getattr(corpus, s) for s in SPLITS}})
            except OSError:  # read-only data folders are fine, the next run just tokenises again
                pass
        return corpus


def _cache_path(files: dict[str, Path]) -> Path:
    """A cache file beside the data: ``.lmlab-cache-<source>-<version>.pt``, where <source> names the three
    files' paths and <version> their sizes and mtimes (and the cache format)."""
    source, version = hashlib.sha1(), hashlib.sha1(str(_CACHE_VERSION).encode())
    for split in SPLITS:
        path = Path(files[split]).resolve()
        stat = path.stat() if path.exists() else None
        source.update(str(path).encode())
        version.update(f"{stat and stat.st_size}|{stat and stat.st_mtime_ns}".encode())
    return Path(files["train"]).parent / f".lmlab-cache-{source.hexdigest()[:10]}-{version.hexdigest()[:10]}.pt"


def _write_cache(path: Path, state: dict) -> None:
    """Write the cache atomically, then remove older caches of the same source."""
    atomic_save(state, path)
    source_prefix = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{source_prefix}-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)


class LanguageModelData:
    """A corpus plus how it is batched: hands the trainer each split as a :class:`TokenStream`.

    Reads ``train.txt``/``valid.txt``/``test.txt`` (or other names) from ``path``. Training windows
    are ``bptt`` steps of ``batch_size`` columns (``variable_bptt``: lengths drawn around ``bptt``),
    evaluation windows ``bptt`` steps of ``eval_batch_size`` columns.
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        batch_size: PositiveInt = 20,
        eval_batch_size: PositiveInt = 10,
        bptt: PositiveInt = 35,
        file_names: dict[str, str] | None = None,
        cache: bool = True,
        variable_bptt: bool = False,
    ) -> None:
        if path is None or str(path) == "":
            raise ConfigError(
                "dataset.path is not set: point it at a folder holding train.txt, valid.txt "
                "and test.txt, e.g. dataset.path=/data/my-corpus"
            )
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise ConfigError(
                f"dataset.path={path} is not a folder; give a folder holding train.txt, valid.txt and test.txt"
            )
        names = file_names or {split: f"{split}.txt" for split in SPLITS}
        self.files = {split: self.path / names[split] for split in SPLITS}
        missing = [str(f) for f in self.files.values() if not f.is_file()]
        if missing:
            raise DataError(f"missing data files: {', '.join(missing)}")
        self.batch_size, self.eval_batch_size, self.bptt = batch_size, eval_batch_size, bptt
        self.variable_bptt = variable_bptt
        self.corpus = Corpus.from_files(self.files, cache=cache)
        self.vocab = self.corpus.vocab
        self._check_sizes()

    def _check_sizes(self) -> None:
        for split, batch_size, key in (
            ("train", self.batch_size, "batch_size"),
            ("valid", self.eval_batch_size, "eval_batch_size"),
            ("test", self.eval_batch_size, "eval_batch_size"),
        ):
            steps = len(getattr(self.corpus, split)) // batch_size
            if steps < 2:
                raise ConfigError(
                    f"dataset.{key}={batch_size} is too large for the {split} split "
                    f"({len(getattr(self.corpus, split))} tokens); lower dataset.{key}"
                )
            if split == "train" and self.bptt >= steps:
                raise ConfigError(
                    f"dataset.bptt={self.bptt} is longer than the data: the train split gives "
                    f"{steps} steps per column at batch_size {batch_size}; "
                    f"set dataset.bptt below {steps} or lower dataset.batch_size"
                )

    def stream(self, split: str) -> TokenStream:
        """``train``: training windows; ``valid``/``test``: evaluation windows (fixed length)."""
        if split == "train":
            return TokenStream(self.corpus.train, self.batch_size, self.bptt, self.variable_bptt)
        return TokenStream(getattr(self.corpus, split), self.eval_batch_size, self.bptt)

    def eval_stream(self, tokens: torch.Tensor, bptt: int | None = None) -> TokenStream:
        """Any token stream (e.g. text encoded with a checkpoint's vocabulary) as evaluation windows of
        ``bptt`` steps (default: the dataset's)."""
        return TokenStream(tokens, self.eval_batch_size, bptt or self.bptt)


class WikiText2(LanguageModelData):
    """WikiText-2 (v1, tokenised) under ``<root>/wikitext-2``, downloaded from ``mirrors`` if missing."""

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        mirrors: list[str] | tuple[str, ...] = (),
        batch_size: PositiveInt = 20,
        eval_batch_size: PositiveInt = 10,
        bptt: PositiveInt = 35,
        cache: bool = True,
        variable_bptt: bool = False,
    ) -> None:
        folder = ensure_wikitext2(root, list(mirrors))
        super().__init__(folder, batch_size, eval_batch_size, bptt, WIKITEXT2_FILES, cache, variable_bptt)


# The dataset classes a checkpoint's stored run config may name: a record is rebuilt only through this
# table, with type-checked plain arguments — never by importing what the file says.
DATASETS: dict[str, type[LanguageModelData]] = {
    "lmlab.data.LanguageModelData": LanguageModelData,
    "lmlab.data.WikiText2": WikiText2,
}


def dataset_from_record(record: dict) -> LanguageModelData:
    """Rebuild the dataset a run used from its stored config (``checkpoint["config"]["dataset"]``)."""
    target = record.get("_target_") if isinstance(record, dict) else None
    if target not in DATASETS:
        raise ConfigError(
            f"the checkpoint's dataset ({target!r}) is not one lmlab rebuilds; name one, e.g. "
            "dataset=text_dir dataset.path=DIR"
        )
    arguments = {k: v for k, v in record.items() if k != "_target_"}
    check_arguments(DATASETS[target], arguments, "dataset", hydra_keys=False)
    return DATASETS[target](**arguments)
