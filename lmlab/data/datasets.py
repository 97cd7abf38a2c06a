"""Datasets: a corpus (:mod:`lmlab.data.corpus`) plus how it is batched, and the named corpora lmlab
downloads (WikiText-2, WikiText-103). A dataset hands the trainer each split as a
:class:`~lmlab.data.batching.TokenStream`.

Datasets are a registry (:data:`DATASETS`, like models): ``conf/dataset/<option>.yaml`` names one with
``name:`` and gives its arguments; a dataset of your own is a :class:`LanguageModelData` subclass
registered with ``@register_dataset("mine")`` in a module given as ``plugins=[module]``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmlab.config.schema import PositiveInt
from lmlab.data.batching import TokenStream
from lmlab.data.corpus import EOS, SPLITS, UNK, Corpus, Vocabulary, tokenize
from lmlab.data.sources import WIKITEXT2, WIKITEXT103, CorpusSource, ensure_corpus
from lmlab.errors import ConfigError, DataError
from lmlab.registry import Registry

__all__ = ["DATASETS", "EOS", "UNK", "Corpus", "LanguageModelData", "Vocabulary", "register_dataset", "tokenize"]


class LanguageModelData:
    """A corpus plus how it is batched — the dataset contract (``dataset=text_dir``).

    Reads ``train.txt``/``valid.txt``/``test.txt`` (or other names) from ``path``. Training windows
    are ``bptt`` steps of ``batch_size`` columns (``variable_bptt``: lengths drawn around ``bptt``),
    evaluation windows ``bptt`` steps of ``eval_batch_size`` columns. ``max_vocab`` / ``min_freq`` cap
    the vocabulary (rarer train words become ``<unk>`` in every split: :meth:`Corpus.capped`).

    What the trainer and the tools use: ``vocab`` (a :class:`Vocabulary`), ``files`` (split → text file),
    :meth:`stream` and :meth:`eval_stream`. A subclass takes ``batch_size``, ``eval_batch_size``, ``bptt``,
    ``variable_bptt``, ``max_vocab`` and ``min_freq`` like this one. ``record_fields`` names the
    arguments besides those that a checkpoint's stored config may decide when ``lmlab.evaluate``
    rebuilds the dataset from it (printed first; every other argument comes from the installed
    config): a checkpoint is a file lmlab is handed, so by default it decides no path, root, mirror
    or file name.
    """

    record_fields: tuple[str, ...] = ("path",)  # the run's own text folder (its standard file names only)

    def __init__(
        self,
        path: str | os.PathLike | None,
        batch_size: PositiveInt = 20,
        eval_batch_size: PositiveInt = 10,
        bptt: PositiveInt = 35,
        file_names: dict[str, str] | None = None,
        cache: bool = True,
        variable_bptt: bool = False,
        max_vocab: PositiveInt | None = None,
        min_freq: PositiveInt = 1,
    ) -> None:
        if max_vocab is not None and max_vocab < 3:
            raise ConfigError(f"dataset.max_vocab={max_vocab} leaves no word besides <unk> and <eos>; give 3 or more")
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
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.bptt = bptt
        self.variable_bptt = variable_bptt
        self.corpus = Corpus.from_files(self.files, cache=cache).capped(max_vocab, min_freq)
        self.vocab = self.corpus.vocab
        if len(self.vocab) < 3:
            raise ConfigError(
                f"dataset.min_freq={min_freq} leaves no word besides <unk> and <eos> (no training word is seen that "
                "often); lower dataset.min_freq"
            )
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

    source: CorpusSource = WIKITEXT2
    record_fields = ()  # root and mirrors: always the installed config's

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        mirrors: list[str] | tuple[str, ...] = (),
        batch_size: PositiveInt = 20,
        eval_batch_size: PositiveInt = 10,
        bptt: PositiveInt = 35,
        cache: bool = True,
        variable_bptt: bool = False,
        max_vocab: PositiveInt | None = None,
        min_freq: PositiveInt = 1,
    ) -> None:
        folder = ensure_corpus(self.source, root, list(mirrors))
        super().__init__(
            folder, batch_size, eval_batch_size, bptt, self.source.files, cache, variable_bptt, max_vocab, min_freq
        )


class WikiText103(WikiText2):
    """WikiText-103 (v1, tokenised: 103 M train tokens, vocabulary 267,735) under ``<root>/wikitext-103``.
    Its ids are cached memory-mapped (:mod:`lmlab.data.corpus`); pair it with ``model.softmax=adaptive``."""

    source = WIKITEXT103


DATASETS = Registry("dataset", "dataset.name", LanguageModelData)
register_dataset = DATASETS.register  # class decorator: make a dataset buildable as dataset.name: <name>
register_dataset("text_dir")(LanguageModelData)
register_dataset("wikitext2")(WikiText2)
register_dataset("wikitext103")(WikiText103)

# Checkpoints written before datasets were named stored a class path (``_target_``) instead.
RECORDED_TARGETS = {
    "lmlab.data.LanguageModelData": "text_dir",
    "lmlab.data.WikiText2": "wikitext2",
    "lmlab.data.WikiText103": "wikitext103",
}
