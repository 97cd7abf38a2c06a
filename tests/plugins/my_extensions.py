"""A user's plugin module, outside lmlab/: one extension of each kind, registered the way the README says
(imported with ``plugins=[my_extensions]``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmlab.config.schema import PositiveInt, Probability
from lmlab.data import LanguageModelData
from lmlab.data.datasets import register_dataset
from lmlab.evaluation.methods import EvaluationInputs, Scored, register_method
from lmlab.loggers import Logger, register_logger
from lmlab.training.hooks import FitContext, Hook


@register_dataset("lowercased_text")
class LowercasedText(LanguageModelData):
    """A text folder whose files are read lower-cased into ``<cache>/lower`` first; a checkpoint may
    decide its folder (``path``) and ``marker``, nothing else."""

    record_fields = ("path", "marker")

    def __init__(self, path: str, marker: str = "x", batch_size: PositiveInt = 20, eval_batch_size: PositiveInt = 10,
                 bptt: PositiveInt = 35, variable_bptt: bool = False, cache: bool = True,
                 max_vocab: PositiveInt | None = None, min_freq: PositiveInt = 1) -> None:  # fmt: skip
        self.marker = marker
        super().__init__(path, batch_size, eval_batch_size, bptt, cache=cache, variable_bptt=variable_bptt,
                         max_vocab=max_vocab, min_freq=min_freq)  # fmt: skip


@register_method("mixed_uniform")
def mixed_uniform(inputs: EvaluationInputs, weight: Probability = 0.1) -> Scored:
    """The model's probabilities mixed with a uniform distribution (a method whose signature is its schema)."""
    import torch

    target = inputs.stream(inputs.split)
    total, count = 0.0, 0
    model = inputs.model.eval()
    with torch.inference_mode():
        state = model.init_state(target.batch_size, target.columns.device)
        for window in target.windows(limit=inputs.limit):
            features, state = model(window.inputs, state)
            probs = model.log_probs(features).exp().gather(-1, window.targets.unsqueeze(-1)).squeeze(-1)
            mixed = (1 - weight) * probs + weight / model.vocab_size
            total += -mixed.log().sum().item()
            count += window.targets.numel()
    return Scored(total / count, target, {"weight": weight})


@register_logger("epochs_file")
class EpochsFile(Logger):
    """Writes each epoch's validation perplexity to ``<run dir>/<file_name>``."""

    def __init__(self, out_dir: str, run_config: dict[str, Any], group: str | None = None, name: str | None = None,
                 file_name: str = "epochs.txt") -> None:  # fmt: skip
        self.path = Path(out_dir) / file_name
        self.labels = (group, name)

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"epoch": metrics["epoch"], "val_ppl": metrics["val_ppl"]}) + "\n")


class CountSteps(Hook):
    """Counts training steps and stops training after ``stop_after`` of them."""

    instances: list[CountSteps] = []

    def __init__(self, stop_after: PositiveInt = 1_000_000) -> None:
        self.stop_after, self.steps, self.epochs_seen = stop_after, 0, []
        CountSteps.instances.append(self)

    def on_step_end(self, ctx: FitContext) -> None:
        self.steps += 1
        ctx.stop_training = ctx.stop_training or self.steps >= self.stop_after

    def on_epoch_end(self, ctx: FitContext, metrics: dict[str, Any]) -> None:
        self.epochs_seen.append(metrics["epoch"])


class ScaleWeights(Hook):
    """Multiplies every weight by ``factor`` before the first step: a model confidently wrong from the start."""

    def __init__(self, factor: float = 1.0) -> None:
        self.factor = factor

    def on_fit_start(self, ctx):
        with torch.no_grad():
            for p in ctx.model.parameters():
                p.mul_(self.factor)
