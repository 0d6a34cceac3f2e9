"""Loss normalisation over the GLOBAL batch of one optimizer step (all micro-batches on all ranks).

Used by `rock_dist.engine.trainer` once per micro-batch. The criterion (rock_dist.model.losses) normalises each
loss over the batch it is given: the detection loss is a mean over images, scene and depth means over the samples
that have them, the normals loss a mean over the valid pixels of the batch: each task's `count` (rock_dist.tasks)
says what its loss averages over. Accelerate divides each micro-batch's loss by the number of micro-batches K, and
DDP averages gradients over the W ranks, so micro-batch m ends up with coefficient 1/M (M = K x W). That equals
the mean over the global batch only when every micro-batch holds the same number of counted items — false for the
normals loss whenever masks differ, and for any task with missing modalities or a short batch.

The fix: before the forward passes of a step, count per micro-batch the items each loss averages over, all-reduce
the totals N, and weight micro-batch m's loss for task t by r = M x n_m / N. Then Σ_m r/M x (Σ_{i∈m} l_i / n_m)
= Σ_i l_i / N exactly: 2 x batch 2 and 1 x batch 4 (or 2 ranks x batch 2) give the same gradient. When all counts
are equal every r is exactly 1.0 and the components are used unchanged. The criterion applies the ratios
(`criterion(outputs, batch, ratios, weights)`, rock_dist.model.losses.compose_losses): the total loss is composed
there only.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from rock_dist.config import LossConfig
from rock_dist.tasks import registry

# The count vector's first entry: images, what the detection loss averages over; then one per registered task.
DETECTION_KEY = "det"


def count_keys() -> tuple[str, ...]:
    """Order of the count vector: detection (images), then the registered auxiliary tasks in registry order."""
    return (DETECTION_KEY, *registry.names())


def micro_batch_counts(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """float64 vector on the CPU in `count_keys()` order: images, then each task's count (samples with scene,
    samples with depth, valid normal pixels, ...) of `batch`.

    `batch` is the CPU batch of docs/data_format.md (targets already at the model's aux output size, as the criterion
    expects them). Counts mirror the weights of the criterion's masked means.
    """
    counts = [float(batch["images"].shape[0])]
    for task in registry.all_tasks():  # a loop, not a comprehension: the host reads stay in this function
        counts.append(float(task.count(batch)))
    return torch.tensor(counts, dtype=torch.float64)


def loss_ratios(counts: torch.Tensor, global_counts: torch.Tensor, num_micro_global: int) -> dict[str, float]:
    """r = M x n_m / N per loss (0 where N is 0: that loss is exactly 0 in every micro-batch anyway)."""
    out = {}
    for key, n, total in zip(count_keys(), counts.tolist(), global_counts.tolist()):
        out[key] = (num_micro_global * n / total) if total > 0 else 0.0
    return out


def tasks_present(global_counts: torch.Tensor, tasks: Sequence[str]) -> dict[str, bool]:
    """Whether each task has anything to average over in the global batch (host counts of `micro_batch_counts`)."""
    keys = count_keys()
    return {t: float(global_counts[keys.index(t)]) > 0 for t in tasks}


def reference_weights(loss_config: LossConfig) -> dict[str, float]:
    """The fixed weight of every registered task under `loss_config` (the reference's 3 / 3 / 30 by default)."""
    return {task.name: task.weight(loss_config) for task in registry.all_tasks()}


__all__ = ["DETECTION_KEY", "count_keys", "micro_batch_counts", "loss_ratios", "tasks_present", "reference_weights"]
