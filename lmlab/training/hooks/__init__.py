"""What hangs on the training loop: the contract (:mod:`~lmlab.training.hooks.base`) and one module per hook,
named as its key in ``conf/hooks/``."""

from lmlab.training.hooks.base import FitContext, Hook, evaluation_weights, good_checkpoint

__all__ = ["FitContext", "Hook", "evaluation_weights", "good_checkpoint"]
