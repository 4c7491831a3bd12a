"""The learning rate over a run: a factor of each network's own rate, a pure function of the step.

`constant` keeps the optimizer's rates. `power_decay` is the authors' annealing (deeppy's GammaAnnealer,
which their CelebA script uses: RMSProp from 0.025 down to 1e-5 per example, divided by the batch size
64, so from 3.9e-4; power 0.75; changed once per "epoch" of 250 batches, over 250 of them):

    factor(step) = 1 - (t / T) ** power * (1 - final_fraction),   t = min(step // every * every, T)

with T = `lr_schedule.steps` (the run's length by default). The authors' values (celeba_aegan.py, which
overrides aegan.train's defaults of 0.01 over 150 epochs): power 0.75, final_fraction
1e-5 / 0.025 = 4e-4, every 250, T = 250 x 250 = 62,500 steps (launch/configs/vaegan-celeba-authors.yaml).

Because the rate depends on the step alone, a resumed run needs no scheduler state: the step in the
checkpoint gives the rate back exactly.
"""

from __future__ import annotations

from pipeline.config.sections import LRScheduleConfig


def lr_factor(schedule: LRScheduleConfig, step: int, total_steps: int) -> float:
    """The factor applied to every network's rate during optimizer step `step` (0 for the first)."""
    if schedule.name == "constant":
        return 1.0
    length = schedule.steps or total_steps
    elapsed = min(step // schedule.every * schedule.every, length)
    return 1.0 - (elapsed / length) ** schedule.power * (1.0 - schedule.final_fraction)
