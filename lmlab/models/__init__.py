"""Language models: the contract (:class:`LanguageModel`), the registry, and the built-in models.

Importing this package registers ``rnn`` (LSTM/GRU), ``pointer_rnn`` (an RNN + pointer sentinel) and
``transformer``.
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
from lmlab.models.pointer import PointerRNNLanguageModel
from lmlab.models.rnn import RNNLanguageModel
from lmlab.models.transformer import TransformerLanguageModel

__all__ = [
    "MODELS",
    "LanguageModel",
    "PointerRNNLanguageModel",
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
