"""The learning rate as a pure function of the global iteration: step decay or linear decay, with optional warmup.

Called by `rock_dist.engine.trainer`, which wraps `lr_factor` in a LambdaLR stepped once per global iteration.
Because the rate depends only on the iteration and the flags, a resumed run needs no scheduler state beyond the
iteration itself: a run extended with new milestones or another schedule continues at the rate its flags give for
the iteration it resumes at, and an unchanged resume computes the same floats as the uninterrupted run.
"""

from __future__ import annotations

from typing import Literal, Sequence

Schedule = Literal["step", "linear"]


def lr_factor(step: int, *, schedule: Schedule, num_iters: int, milestones: Sequence[int] = (), gamma: float = 0.1,
              warmup_iters: int = 0) -> float:
    """Multiplier of the base LR for the optimizer step taken after `step` completed iterations (0-based).

    - "step": gamma ** (number of milestones <= step), the reference's MultiStepLR;
    - "linear": 1 - step / num_iters, decaying to zero at the end of the run. With a fixed budget of iterations,
      linear decay to zero is the schedule that measured best across tasks (Li et al., "Budgeted training", ICLR
      2020), which is what a short run such as the quickstart's is.
    During the first `warmup_iters` iterations the factor is further multiplied by (step + 1) / warmup_iters.
    """
    if schedule == "step":
        factor = gamma ** sum(1 for m in milestones if m <= step)
    elif schedule == "linear":
        factor = max(0.0, 1.0 - step / max(num_iters, 1))
    else:
        raise ValueError(f"unknown LR schedule {schedule!r}")
    if warmup_iters > 0 and step < warmup_iters:
        factor *= (step + 1) / warmup_iters
    return factor


__all__ = ["Schedule", "lr_factor"]
