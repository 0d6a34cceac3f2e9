"""Auxiliary-task metrics: scene accuracy, depth abs-rel / RMSE / δ<1.25, normals angle statistics (docs/evaluation.md).

Called by `rock_dist.engine.evaluation.evaluate` in two steps so that the numbers do not depend on how images were
split across ranks: `aux_image_stats` turns one batch of predictions into small per-image records (computed on the
batch's device, then moved to the CPU), which are gathered with the detections; `aggregate_aux_stats` combines the
de-duplicated records in image-id order on one process.

Definitions (pooled over all valid pixels of the evaluated set, as in Eigen et al.):
- depth: prediction = exp(predicted log depth) at the auxiliary map size; valid pixels have a finite target > 0 in
  images whose depth is present; abs-rel = mean |p - t| / t, RMSE = sqrt(mean (p - t)^2) in metres,
  δ<1.25 = fraction with max(p / t, t / p) < 1.25.
- normals: angle between the normalised prediction and the target over pixels of the validity mask in images with
  normals; mean and median in degrees, fractions below 11.25°, 22.5° and 30°.
- scene: top-1 accuracy over images with a scene label.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

NORMAL_ANGLE_THRESHOLDS: dict[str, float] = {"normals_11_25": 11.25, "normals_22_5": 22.5, "normals_30": 30.0}

# Keys of the aggregated dictionary, with a short description (used by the console table and the README).
AUX_METRIC_NAMES: dict[str, str] = {
    "scene_accuracy": "scene top-1 accuracy",
    "depth_abs_rel": "depth mean |p - t| / t",
    "depth_rmse": "depth RMSE (m)",
    "depth_delta1": "depth fraction with max(p/t, t/p) < 1.25",
    "normals_mean": "normals mean angle (deg)",
    "normals_median": "normals median angle (deg)",
    "normals_11_25": "normals fraction under 11.25 deg",
    "normals_22_5": "normals fraction under 22.5 deg",
    "normals_30": "normals fraction under 30 deg",
}


def _match_size(prediction: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:  # size: (h, w)
    # The pipeline makes targets at the first feature-map size, which is the prediction size; resize only if a
    # caller chose another target size, so the comparison is still made pixel for pixel.
    if tuple(prediction.shape[-2:]) == tuple(size):
        return prediction
    return F.interpolate(prediction.float(), size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def aux_image_stats(outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                    tasks: Sequence[str]) -> list[dict[str, Any]]:
    """Per-image sufficient statistics of the auxiliary predictions of one batch.

    outputs: the model's dict with, per task in `tasks`, `scene` B x S log-probabilities, `depth` B x 1 x h x w
    log depth, `normals` B x 3 x h x w. batch: the (device) batch with `scene` B, `has_scene` B, `depth`
    B x 1 x h x w metres, `has_depth` B, `normals` B x 3 x h x w, `normals_mask` B x 1 x h x w, `has_normals` B.
    Returns B dicts with (where the task is trained and the image has the target):
    `scene_correct` bool; `depth` (sum abs-rel, sum squared error, count δ<1.25, valid pixels);
    `normals_angles` float32 array of angles in degrees. Missing entries are None. Needs `image_id` B in batch.
    """
    batch_size = int(batch["image_id"].shape[0])
    records: list[dict[str, Any]] = [{"scene_correct": None, "depth": None, "normals_angles": None}
                                     for _ in range(batch_size)]

    if "scene" in tasks and "scene" in outputs:
        predicted = outputs["scene"].argmax(dim=1)
        target = batch["scene"].to(predicted.device)
        has = batch["has_scene"].to(predicted.device).bool() & (target >= 0)
        correct = (predicted == target).cpu().tolist()
        for i, (ok, present) in enumerate(zip(correct, has.cpu().tolist())):
            records[i]["scene_correct"] = bool(ok) if present else None

    if "depth" in tasks and "depth" in outputs:
        target = batch["depth"].float()
        predicted = torch.exp(_match_size(outputs["depth"].float(), tuple(target.shape[-2:])))
        valid = torch.isfinite(target) & (target > 0)
        valid &= batch["has_depth"].to(valid.device).bool().view(-1, 1, 1, 1)
        safe_t = torch.where(valid, target, torch.ones_like(target))
        zero = torch.zeros_like(target)
        # torch.where rather than multiplying by the mask: an overflowing exp() on an invalid pixel must not
        # turn the image's sums into NaN (inf * 0).
        abs_rel = torch.where(valid, (predicted - safe_t).abs() / safe_t, zero)
        sq = torch.where(valid, (predicted - safe_t).square(), zero)
        ratio = torch.maximum(predicted / safe_t, safe_t / predicted.clamp_min(1e-12))
        delta = (ratio < 1.25) & valid
        # float64 sums: exact enough that pooling per-image sums equals pooling pixels, whatever the split.
        sums = torch.stack([abs_rel.double().flatten(1).sum(1), sq.double().flatten(1).sum(1),
                            delta.flatten(1).sum(1).double(), valid.flatten(1).sum(1).double()], 1).cpu().tolist()
        for i, (row, present) in enumerate(zip(sums, batch["has_depth"].cpu().tolist())):
            if present and row[3] > 0:
                records[i]["depth"] = (row[0], row[1], int(row[2]), int(row[3]))

    if "normals" in tasks and "normals" in outputs:
        target = batch["normals"].float()
        predicted = _match_size(outputs["normals"].float(), tuple(target.shape[-2:]))
        predicted = F.normalize(predicted, dim=1, eps=1e-12)
        target = F.normalize(target, dim=1, eps=1e-12)
        cosine = (predicted * target).sum(1).clamp(-1.0, 1.0)  # B x h x w
        angles = torch.rad2deg(torch.acos(cosine)).cpu()
        mask = batch["normals_mask"].bool().reshape(cosine.shape).cpu()
        mask &= batch["has_normals"].bool().cpu().view(-1, 1, 1)
        for i in range(angles.shape[0]):
            if mask[i].any():
                records[i]["normals_angles"] = angles[i][mask[i]].numpy().astype(np.float32)

    return records


def aggregate_aux_stats(records: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """Combine per-image statistics (already unique per image, in image-id order) into the aux metrics.

    Returns only the metrics of tasks with at least one valid target, plus their counts (`num_scene`,
    `depth_pixels`, `normals_pixels`).
    """
    out: dict[str, float | int] = {}
    scene = [r["scene_correct"] for r in records if r.get("scene_correct") is not None]
    if scene:
        out["scene_accuracy"] = sum(scene) / len(scene)
        out["num_scene"] = len(scene)

    depth = [r["depth"] for r in records if r.get("depth") is not None]
    if depth:
        # math.fsum: the exact sum, so the result cannot depend on the order images arrived in.
        n = sum(d[3] for d in depth)
        out["depth_abs_rel"] = math.fsum(d[0] for d in depth) / n
        out["depth_rmse"] = math.sqrt(math.fsum(d[1] for d in depth) / n)
        out["depth_delta1"] = sum(d[2] for d in depth) / n
        out["depth_pixels"] = n

    normals = [r["normals_angles"] for r in records if r.get("normals_angles") is not None]
    if normals:
        angles = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in normals])
        out["normals_mean"] = math.fsum(angles.tolist()) / angles.size
        out["normals_median"] = float(np.median(angles))
        for name, threshold in NORMAL_ANGLE_THRESHOLDS.items():
            out[name] = float(np.count_nonzero(angles < threshold)) / angles.size
        out["normals_pixels"] = int(angles.size)
    return out


__all__ = ["AUX_METRIC_NAMES", "NORMAL_ANGLE_THRESHOLDS", "aux_image_stats", "aggregate_aux_stats"]
