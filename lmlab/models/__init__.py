"""Language models: the contract (:class:`LanguageModel`), bodies and heads, and how they are composed.

Importing this package registers the bodies ``rnn`` (LSTM/GRU) and ``transformer``
(``model.name``), and the heads ``pointer`` (a pointer sentinel, :mod:`lmlab.models.pointer`) and
``ngram`` (a Kneser-Ney n-gram of the training text mixed in by a learned gate,
:mod:`lmlab.models.ngram_mixture`) that go on any body (``model.heads``; :mod:`lmlab.models.compose`).
"""

from lmlab.models.base import MODELS, LanguageModel, ReadsTrainingText, State, diverged, map_tensors, register_model
from lmlab.models.compose import (
    COMBINED_NAMES,
    HEADS,
    build_model,
    check_model_arguments,
    model_class,
    register_head,
)
from lmlab.models.ngram_mixture import NgramMixture
from lmlab.models.pointer import PointerSentinel
from lmlab.models.rnn import RNNLanguageModel
from lmlab.models.transformer import TransformerLanguageModel

__all__ = [
    "COMBINED_NAMES",
    "HEADS",
    "MODELS",
    "LanguageModel",
    "NgramMixture",
    "PointerSentinel",
    "RNNLanguageModel",
    "ReadsTrainingText",
    "State",
    "TransformerLanguageModel",
    "build_model",
    "check_model_arguments",
    "diverged",
    "map_tensors",
    "model_class",
    "register_head",
    "register_model",
]
