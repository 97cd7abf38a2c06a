"""``method=static``: the model as trained (:meth:`lmlab.training.trainer.Trainer.evaluate`)."""

from __future__ import annotations

from lmlab.evaluation.methods import EvaluationInputs, Scored, register_method


@register_method("static")
def static(inputs: EvaluationInputs) -> Scored:
    """The model as trained."""
    target = inputs.stream(inputs.split)
    return Scored(inputs.static_loss(target), target)
