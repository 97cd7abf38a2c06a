"""lmlab: Hydra-configured recurrent word-level language models (train, evaluate, generate)."""

__version__ = "0.1.0"
