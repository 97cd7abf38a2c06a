"""Using a trained model: evaluation methods (static, n-gram mixture, neural cache, dynamic evaluation; a registry) and
text generation."""

# Importing the package registers every built-in method: methods.py's own, then the ensemble's (which builds
# on methods.py, so it cannot be imported from there).
from lmlab.evaluation import ensemble, methods  # noqa: E402, F401
