"""Using a trained model: the evaluation methods' contract and registry (:mod:`~lmlab.evaluation.methods`),
one module per method, text generation (:mod:`~lmlab.evaluation.sampling`) and the sweep's ensemble."""

# Importing the package registers every built-in method (each module registers its own).
from lmlab.evaluation import cache, dynamic, ensemble, ngram, static  # noqa: F401
