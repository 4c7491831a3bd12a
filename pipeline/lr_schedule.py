"""The learning rate over a run: a factor of each network's own rate, a pure function of the step.

`constant` keeps the optimizer's rates. `power_decay` is the authors' annealing (deeppy's GammaAnnealer,
which their CelebA script uses: RMSProp from 0.02 down to 1e-5 per example, power 0.75, changed once per
"epoch" of 250 batches, over 150 of them):

    factor(step) = 1 - (t / T) ** power * (1 - final_fraction),   t = min(step // every * every, T)

with T = `lr_schedule.steps` (the run's length by default). The authors' values: power 0.75,
final_fraction 1e-5 / 0.02 = 5e-4, every 250, T = 150 x 250 = 37,500 steps.

Because the rate depends on the step alone, a resumed run needs no scheduler state: the step in the
checkpoint gives the rate back exactly.
"""

from __future__ import annotations

from pipeline.config import LRScheduleConfig


def lr_factor(schedule: LRScheduleConfig, step: int, total_steps: int) -> float:
    """The factor applied to every network's rate during optimizer step `step` (0 for the first)."""
    if schedule.name == "constant":
        return 1.0
    length = schedule.steps or total_steps
    elapsed = min(step // schedule.every * schedule.every, length)
    return 1.0 - (elapsed / length) ** schedule.power * (1.0 - schedule.final_fraction)
