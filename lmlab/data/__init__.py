"""Data: text → vocabulary and ids (:mod:`~lmlab.data.corpus`), ids → training and evaluation windows
(:mod:`~lmlab.data.batching`), named corpora fetched and verified (:mod:`~lmlab.data.sources`), the
dataset registry that ties them together (:mod:`~lmlab.data.datasets`), and a text's Kneser-Ney n-gram
counts (:mod:`~lmlab.data.kneser_ney`: the ``ngram`` head and evaluation method read them)."""

from lmlab.data.batching import TokenStream, Window
from lmlab.data.corpus import EOS, UNK, Corpus, Vocabulary, tokenize
from lmlab.data.datasets import DATASETS, LanguageModelData, WikiText2, WikiText103

__all__ = [
    "DATASETS",
    "EOS",
    "UNK",
    "Corpus",
    "LanguageModelData",
    "TokenStream",
    "Vocabulary",
    "WikiText2",
    "WikiText103",
    "Window",
    "tokenize",
]
