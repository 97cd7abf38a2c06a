"""A search-only hook (#21): dropout that rises over the run ("curriculum dropout", Morerio et al. 2017).

Round C showed half of cpu_fast's dropout learning faster on wt2-small for ~8 epochs, then over-fitting,
while all of it learns more slowly and keeps improving. This tries both in one run: the model's dropout
starts at ``start_scale`` of its configured rates and rises linearly to all of them at ``full_at`` (a fraction
of ``max_time_s``). Not saved in checkpoints (search runs are not resumed).

    PYTHONPATH=experiments/search python -m lmlab.run +experiment=cpu_fast \\
      +hooks.curriculum._target_=dropout_curriculum.DropoutCurriculum +hooks.curriculum.start_scale=0.5 \\
      +hooks.curriculum.full_at=0.5 +hooks.curriculum.max_time_s=900
"""

from __future__ import annotations

from lmlab.training.hooks import FitContext, Hook


class DropoutCurriculum(Hook):
    def __init__(self, start_scale: float, full_at: float, max_time_s: float) -> None:
        self.start_scale, self.full_at, self.max_time_s = start_scale, full_at, max_time_s

    def on_fit_start(self, ctx: FitContext) -> None:
        ctx.model.scale_dropout(self.start_scale)

    def on_step_end(self, ctx: FitContext) -> None:
        progress = min(1.0, ctx.state.elapsed_s / self.max_time_s / self.full_at)
        ctx.model.scale_dropout(self.start_scale + (1.0 - self.start_scale) * progress)
