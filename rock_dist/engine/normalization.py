"""Loss normalisation over the GLOBAL batch of one optimizer step (all micro-batches on all ranks).

Used by `rock_dist.engine.trainer` once per micro-batch. The criterion (rock_dist.model.losses) normalises each
loss over the batch it is given: the detection loss is a mean over images, scene and depth means over the samples
that have them, the normals loss a mean over the valid pixels of the batch. Accelerate divides each micro-batch's
loss by the number of micro-batches K, and DDP averages gradients over the W ranks, so micro-batch m ends up with
coefficient 1/M (M = K x W). That equals the mean over the global batch only when every micro-batch holds the same
number of counted items — false for the normals loss whenever masks differ, and for any task with missing
modalities or a short batch.

The fix: before the forward passes of a step, count per micro-batch the items each loss averages over, all-reduce
the totals N, and weight micro-batch m's loss for task t by r = M x n_m / N. Then Σ_m r/M x (Σ_{i∈m} l_i / n_m)
= Σ_i l_i / N exactly: 2 x batch 2 and 1 x batch 4 (or 2 ranks x batch 2) give the same gradient. When all counts
are equal every r is exactly 1.0 and the criterion's own total is used unchanged.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from rock_dist.config import LossConfig

# Order of the count vector: detection (images), then the auxiliary tasks.
COUNT_KEYS: tuple[str, ...] = ("det", "scene", "depth", "normals")


def micro_batch_counts(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """float64 (4,) on the CPU: images, samples with scene, samples with depth, valid normal pixels of `batch`.

    `batch` is the CPU batch of docs/data_format.md (targets already at the model's aux output size, as the criterion
    expects them). Counts mirror the weights of the criterion's masked means.
    """
    images = batch["images"].shape[0]
    normals: torch.Tensor | int
    scene = (batch["has_scene"].bool() & (batch["scene"] >= 0)).sum() if "has_scene" in batch else 0
    depth = batch["has_depth"].bool().sum() if "has_depth" in batch else 0
    if "normals_mask" in batch and "has_normals" in batch:
        mask = batch["normals_mask"][:, 0].bool() & batch["has_normals"].bool()[:, None, None]
        normals = mask.sum()
    else:
        normals = 0
    return torch.tensor([float(images), float(scene), float(depth), float(normals)], dtype=torch.float64)


def loss_ratios(counts: torch.Tensor, global_counts: torch.Tensor, num_micro_global: int) -> dict[str, float]:
    """r = M x n_m / N per loss (0 where N is 0: that loss is exactly 0 in every micro-batch anyway)."""
    out = {}
    for key, n, total in zip(COUNT_KEYS, counts.tolist(), global_counts.tolist()):
        out[key] = (num_micro_global * n / total) if total > 0 else 0.0
    return out


def tasks_present(global_counts: torch.Tensor, tasks: Sequence[str]) -> dict[str, bool]:
    """Whether each task has anything to average over in the global batch (host counts of `micro_batch_counts`)."""
    return {t: float(global_counts[COUNT_KEYS.index(t)]) > 0 for t in tasks}


def reference_weights(loss_config: LossConfig) -> dict[str, float]:
    """The fixed auxiliary weights of `loss_config` (the reference's 3 / 3 / 30 by default)."""
    return {"scene": loss_config.scene_weight, "depth": loss_config.depth_weight,
            "normals": loss_config.normals_weight}


def normalized_losses(losses: Mapping[str, torch.Tensor], ratios: Mapping[str, float], tasks: Sequence[str],
                      loss_config: LossConfig, weights: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """The micro-batch's losses re-weighted for the global batch: "loss" (to back-propagate) and the components.

    Components are scaled by their ratio so that summing them over the step's micro-batches and ranks and
    dividing by M gives the global-batch value of each component (what the console and TensorBoard show).
    `weights`: the auxiliary weights of this step (engine.task_weighting; None: the fixed ones of `loss_config`).
    """
    out: dict[str, torch.Tensor] = {}
    r_det = ratios["det"]
    for name in ("loss_loc", "loss_conf", "loss_det"):
        if name in losses:
            out[name] = losses[name] * r_det
    fixed = reference_weights(loss_config)
    weights = fixed if weights is None else weights
    for task in tasks:
        out[f"loss_{task}"] = losses[f"loss_{task}"] * ratios[task]
    if all(ratios[k] == 1.0 for k in ("det", *tasks)) and all(weights[t] == fixed[t] for t in tasks):
        out["loss"] = losses["loss"]  # bit-identical to the criterion's own sum in the common case
    else:
        total = out["loss_det"]
        for task in tasks:
            total = total + weights[task] * out[f"loss_{task}"]
        out["loss"] = total
    return out


__all__ = ["COUNT_KEYS", "micro_batch_counts", "loss_ratios", "tasks_present", "reference_weights",
           "normalized_losses"]
