"""Sizing the quickstart to a time budget: which training configuration, how many iterations, and why.

Called by `rock_dist.quickstart` after the rooms are rendered and sharded. The tiers below are listed best first;
each is the cheapest configuration measured to learn at its size (README, "How the defaults were chosen"). The plan
times one training step of a tier on this machine (`perf.autotune`, cached), predicts what evaluation and drawing
will cost afterwards from that step time, and gives training whatever is left of the budget. The cheapest tier is
timed first; a dearer tier is timed only when its step, extrapolated from the cheapest one by pixels, could leave
room for its minimum iterations (on a slow CPU, timing a 240x320 step that cannot fit cost 30-40 s of the budget).
The first tier that can afford its minimum number of iterations wins; on a fast CPU (AMX) or a GPU the top tier
gets more iterations, up to its maximum. Everything here is arithmetic on measured seconds, so a test can inject
the step timings.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class TrainingTier:
    """One training configuration of the quickstart and the iteration range in which it is worth running."""

    name: str
    image_size: tuple[int, int]
    batch_size: int
    min_iters: int  # below this the tier learns too little; the next (cheaper) tier is better value
    max_iters: int  # past this the budget's headroom is not spent (the run just ends sooner)


# Best first. Input size trades prior coverage for speed: at 240x320 83 % of the quickstart rooms' objects have a
# prior at IoU >= 0.5, at 176x240 74 %, at 128x160 60 % (rooms with every object boxed and the camera anywhere:
# 66 %, 55 %, 37 %; hence the quickstart's --min_object_area and --camera_distance). But from scratch, the number of
# images seen matters even more (those rooms, ResNet-18, test AP@.5 on an AVX2 CPU: 176x240 x 340 iterations of 8
# → 2.7 %; 128x160 x 650 → 6.3 %; 240x320 x 650 on AMX → 18.1 %), so a tier is taken only when it affords about
# 4000 images (500 iterations of 8); a CPU that cannot afford it at 176x240 trains more iterations at 128x160
# (README, "How the defaults were chosen").
TIERS: tuple[TrainingTier, ...] = (
    TrainingTier("240x320, batch 8", (240, 320), 8, min_iters=500, max_iters=1500),
    TrainingTier("176x240, batch 8", (176, 240), 8, min_iters=500, max_iters=1500),
    TrainingTier("128x160, batch 8", (128, 160), 8, min_iters=300, max_iters=1500),
)

# What the run costs besides the training steps, predicted from the step time. Each command pays a start-up
# (Python, torch, accelerate imports, model build: ~5-10 s on a 2-core CPU); evaluation and drawing are forward
# passes without gradients, about a third of a training step per image (measured 0.3-0.4 on CPUs).
COMMAND_STARTUP_S = 10.0
INFERENCE_FRACTION = 0.4
FEWEST_ITERS = 20
# The training command pays more than a start-up: the first steps, two checkpoints, TensorBoard pictures and the
# end-of-run validation (measured 45 s over the steps on a 2-core AVX2 CPU); and its loop runs ~8 % slower than
# the timed step, because the loader worker shares the cores.
TRAIN_STARTUP_S = 25.0
TRAINING_SLOWDOWN = 1.1
# Step time grows a little more slowly than the pixels of a step (bigger maps use the cores better): measured on a
# 2-core AMD EPYC (AVX2), resnet18 batch 8 from 128x160 to 176x240 (2.06x the pixels) 1.89x, to 240x320 (3.75x)
# 3.3x, i.e. 0.88-0.92 of proportional. 0.8 keeps the extrapolation optimistic, so a tier that might fit is timed.
PIXEL_SCALING = 0.8
# After the last step the training recomputes its BatchNorm statistics over this many micro-batches
# (`--precise_bn_batches`): at the end of a run this short the running averages lag behind the weights
# (docs/quickstart_experiments.md, session 5: test AP@.5 6.3 -> 8.0 % after 350 iterations on AVX2).
PRECISE_BN_BATCHES = 50


def _pixels(tier: TrainingTier) -> int:
    return tier.image_size[0] * tier.image_size[1] * tier.batch_size


@dataclass(frozen=True)
class BudgetPlan:
    """What the quickstart will train and the arithmetic behind it (printed before training)."""

    tier: TrainingTier
    num_iters: int
    step_seconds: float
    train_seconds: float  # predicted for the training steps
    after_seconds: float  # predicted for validation, evaluation, export and drawing
    reason: str


def predicted_after_training_s(step_seconds: float, batch_size: int, eval_images: int, commands: int = 4) -> float:
    """Seconds of everything after the last step: `commands` start-ups and forward passes over the BatchNorm
    statistics pass's PRECISE_BN_BATCHES micro-batches and over `eval_images` (the val split at the end of
    training, then the test split by evaluate and again by detect)."""
    per_image = step_seconds / max(batch_size, 1) * INFERENCE_FRACTION
    return commands * COMMAND_STARTUP_S + per_image * (eval_images + PRECISE_BN_BATCHES * batch_size)


def plan_training(tiers: Sequence[TrainingTier], step_seconds: Callable[[TrainingTier], float], deadline: float,
                  *, eval_images: int, clock: Callable[[], float] = time.perf_counter) -> BudgetPlan:
    """The first tier of `tiers` whose minimum iterations fit before `deadline` (a `clock()` time), with as many
    iterations as fit (at most its maximum). `step_seconds(tier)` measures a tier and the time it takes is spent
    from the budget: it is called for the cheapest (last) tier first, then, best first, for each dearer tier whose
    step extrapolated from the cheapest by pixels (x PIXEL_SCALING) could afford its minimum iterations.
    When even the last tier cannot reach its minimum, it runs what fits (at least FEWEST_ITERS) and the reason
    says the budget is too short."""
    if not tiers:
        raise ValueError("plan_training needs at least one tier")
    notes: list[str] = []
    cheapest = tiers[-1]
    cheapest_s = float(step_seconds(cheapest))

    def room(tier: TrainingTier, step_s: float) -> tuple[int, float, float]:
        """(iterations that fit, seconds predicted after training, seconds left for the training steps)."""
        after = predicted_after_training_s(step_s, tier.batch_size, eval_images)
        left = deadline - clock() - after - TRAIN_STARTUP_S
        fits = max(0, math.floor(left / (step_s * TRAINING_SLOWDOWN))) if step_s > 0 else tier.max_iters
        return fits, after, left

    for k, tier in enumerate(tiers):
        last = k == len(tiers) - 1
        if not last:
            guess_s = cheapest_s * PIXEL_SCALING * _pixels(tier) / _pixels(cheapest)
            if room(tier, guess_s)[0] < tier.min_iters:
                notes.append(f"{tier.name}: about {guess_s:.2f} s per step (extrapolated from {cheapest.name}, "
                             f"not timed) leaves room for fewer than {tier.min_iters} iterations")
                continue
        step_s = cheapest_s if last else float(step_seconds(tier))
        fits, after, left = room(tier, step_s)
        loop_step_s = step_s * TRAINING_SLOWDOWN
        iters = min(fits, tier.max_iters)
        if iters >= tier.min_iters or last:
            short = iters < tier.min_iters
            iters = max(iters, FEWEST_ITERS)
            reason = (f"{step_s:.2f} s per step of {tier.batch_size} images at {tier.image_size[0]}x"
                      f"{tier.image_size[1]}; {max(left, 0):.0f} s left for training after "
                      f"{after:.0f} s predicted for evaluation and drawing → {iters} iterations")
            if fits > tier.max_iters:
                reason += f" (the tier's maximum; {fits} would fit)"
            if short:
                reason += (f"; the budget is too short for this machine (this tier learns from about "
                           f"{tier.min_iters} iterations): raise --time_budget")
            if notes:
                reason = "; ".join(notes) + "; " + reason
            return BudgetPlan(tier, iters, step_s, iters * loop_step_s, after, reason)
        notes.append(f"{tier.name}: {step_s:.2f} s per step leaves room for {fits} < {tier.min_iters} iterations")
    raise AssertionError("unreachable: the last tier always returns")


__all__ = ["TrainingTier", "TIERS", "BudgetPlan", "plan_training", "predicted_after_training_s",
           "COMMAND_STARTUP_S", "INFERENCE_FRACTION", "FEWEST_ITERS", "TRAIN_STARTUP_S", "TRAINING_SLOWDOWN",
           "PRECISE_BN_BATCHES", "PIXEL_SCALING"]
