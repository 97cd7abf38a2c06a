"""Language models: the contract (:class:`LanguageModel`), the registry, and the built-in models.

Importing this package registers ``rnn`` (LSTM/GRU), ``transformer``, and each of them with a pointer
sentinel (:mod:`lmlab.models.pointer`): ``pointer_rnn``, ``pointer_transformer``; and those two with a
Kneser-Ney n-gram of the training text mixed in by a learned gate (:mod:`lmlab.models.ngram_mixture`):
``ngram_pointer_rnn``, ``ngram_pointer_transformer``.
"""

from lmlab.models.base import (
    MODELS,
    LanguageModel,
    State,
    build_model,
    check_model_arguments,
    diverged,
    map_tensors,
    model_class,
    register_model,
)
from lmlab.models.ngram_mixture import (
    NgramMixture,
    NgramPointerRNNLanguageModel,
    NgramPointerTransformerLanguageModel,
)
from lmlab.models.pointer import PointerRNNLanguageModel, PointerSentinel, PointerTransformerLanguageModel
from lmlab.models.rnn import RNNLanguageModel
from lmlab.models.transformer import TransformerLanguageModel

__all__ = [
    "MODELS",
    "LanguageModel",
    "NgramMixture",
    "NgramPointerRNNLanguageModel",
    "NgramPointerTransformerLanguageModel",
    "PointerRNNLanguageModel",
    "PointerSentinel",
    "PointerTransformerLanguageModel",
    "RNNLanguageModel",
    "State",
    "TransformerLanguageModel",
    "build_model",
    "check_model_arguments",
    "diverged",
    "map_tensors",
    "model_class",
    "register_model",
]
