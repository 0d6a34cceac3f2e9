"""The depth task of the ROCK block: log depth per pixel of the auxiliary map (docs/losses.md, docs/evaluation.md).

Registered in rock_dist.tasks.registry. Shard member `depth.png` / `depth.npy` (uint16 millimetres,
docs/data_format.md), decoded to the field `depth_mm` (None without it). Batch: `depth` float32 B x 1 x h x w (metres,
hole-filled; a dense map sampled following the crop and flip and divided by the crop's zoom, docs/augmentation.md) and
`has_depth` bool B. Head: the mean over the 128 channels of the task map, read as log depth. Loss: SmoothL1 (reference)
or berHu (the paper) against log(clamp(depth)), mean over every pixel of the samples with depth; weight 3. Metrics:
abs-rel, RMSE and δ<1.25, pooled over the valid pixels of the evaluated set.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from rock_dist.data.members import aux_member, check_size
from rock_dist.tasks.base import AuxTask, Batch, BatchGrid, MapGrid, masked_mean, match_size, resize_nearest

if TYPE_CHECKING:
    from rock_dist.config import ModelConfig

# Channels of the task map (reference).
DEPTH_CHANNELS = 128
# Depth targets are clamped to this range (metres) before the log (reference).
DEPTH_MIN, DEPTH_MAX = 1e-3, 10.0
# berHu threshold as a fraction of the largest absolute residual in the batch (Laina et al. 2016).
BERHU_FRACTION = 0.2


def depth_loss(pred: torch.Tensor, depth: torch.Tensor, has_depth: torch.Tensor, kind: str = "smoothl1"
               ) -> torch.Tensor:
    """Loss between predicted log depth B x 1 x h x w and log(clamp(depth, 1e-3, 10)) of the target depth (metres).

    Every pixel of a sample with depth counts (hole-filled depths); samples without depth are left out.
    kind 'smoothl1' (reference) or 'berhu' (the paper: |r| up to c, (r² + c²) / 2c above, with c = 0.2 x the largest
    |r| over the samples with depth).
    """
    pred = pred.float()
    depth = resize_nearest(depth, tuple(pred.shape[-2:]))
    weights = has_depth.bool()[:, None, None, None].float().expand_as(pred)
    # Targets of samples without depth are replaced by a finite value: whatever the loader put there (0, NaN) must
    # not reach the backward pass, where 0 x NaN would still be NaN.
    depth = torch.where(weights > 0, depth.float(), torch.ones_like(pred))
    target = torch.log(depth.clamp(DEPTH_MIN, DEPTH_MAX))
    if kind == "smoothl1":
        per_pixel = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    elif kind == "berhu":
        residual = (pred - target).abs()
        c = (BERHU_FRACTION * torch.where(weights > 0, residual, torch.zeros_like(residual)).amax()).detach()
        c = c.clamp(min=1e-6)
        per_pixel = torch.where(residual <= c, residual, (residual ** 2 + c ** 2) / (2 * c))
    else:
        raise ValueError(f"unknown depth loss {kind!r}; expected 'smoothl1' or 'berhu'")
    return masked_mean(per_pixel, weights)


class DepthTask(AuxTask):
    name = "depth"
    presence_key = "has_depth"
    target_keys = ("depth",)
    reference_weight = 3.0
    metric_names = {"depth_abs_rel": "depth mean |p - t| / t", "depth_rmse": "depth RMSE (m)",
                    "depth_delta1": "depth fraction with max(p/t, t/p) < 1.25"}
    record_key = "depth"
    target_kind = "map"
    decoded_fields = {"depth_mm": None}
    raw_keys = {"depth_mm": "raw_depth"}

    def channels(self, num_scenes: int) -> int:
        return DEPTH_CHANNELS

    def predict(self, task_map: torch.Tensor) -> torch.Tensor:
        return task_map.mean(dim=1, keepdim=True)

    def loss(self, prediction: torch.Tensor, batch: Batch, config: ModelConfig) -> torch.Tensor:
        return depth_loss(prediction, batch["depth"], batch["has_depth"], config.depth_loss)

    def count(self, batch: Batch) -> torch.Tensor | int:
        return batch["has_depth"].bool().sum() if "has_depth" in batch else 0

    def image_stats(self, prediction: torch.Tensor, batch: Batch) -> list[Any]:
        """(sum abs-rel, sum squared error, count δ<1.25, valid pixels) per image with depth."""
        target = batch["depth"].float()
        predicted = torch.exp(match_size(prediction.float(), tuple(target.shape[-2:])))
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
        return [(row[0], row[1], int(row[2]), int(row[3])) if present and row[3] > 0 else None
                for row, present in zip(sums, batch["has_depth"].cpu().tolist())]

    def aggregate(self, records: Sequence[Any]) -> dict[str, float | int]:
        # math.fsum: the exact sum, so the result cannot depend on the order images arrived in.
        n = sum(d[3] for d in records)
        return {"depth_abs_rel": math.fsum(d[0] for d in records) / n,
                "depth_rmse": math.sqrt(math.fsum(d[1] for d in records) / n),
                "depth_delta1": sum(d[2] for d in records) / n, "depth_pixels": n}

    def format_metric(self, key: str, value: float) -> str:
        return f"{value:.4f}" if key in ("depth_abs_rel", "depth_rmse") else super().format_metric(key, value)

    def pictures(self, prediction: torch.Tensor, batch: Batch, index: int, *, image: torch.Tensor,
                 scene_types: Sequence[str]) -> dict[str, torch.Tensor]:
        from rock_dist.engine.visualize import colorize_depth

        pred_depth = prediction[index, 0].exp()  # the model predicts log depth
        gt_depth = batch["depth"][index, 0]
        # One colour scale for prediction and ground truth, so they can be compared by eye.
        valid = gt_depth[gt_depth > 0]
        lo, hi = (float(valid.min()), float(valid.max())) if valid.numel() else (None, None)
        return {"depth_pred": colorize_depth(pred_depth, min_depth=lo, max_depth=hi),
                "depth_gt": colorize_depth(gt_depth, min_depth=lo, max_depth=hi)}

    def original_picture(self, prediction: torch.Tensor, size: tuple[int, int], *, image: torch.Tensor,
                         scene_types: Sequence[str]) -> torch.Tensor | None:
        from rock_dist.engine.visualize import colorize_depth

        # Upsample the log depth (smooth in log space) to the original picture, then exponentiate.
        log_depth = F.interpolate(prediction[None].float(), size=size, mode="bilinear", align_corners=False)
        return colorize_depth(log_depth[0, 0].exp())

    def decode(self, raw: Mapping[str, Any], size: tuple[int, int], loc: str) -> dict[str, Any]:
        depth = aux_member(raw, "depth", loc, kind="16-bit single-channel (millimetres)")
        check_size(loc, "depth", depth, size)
        return {"depth_mm": depth}

    def synthetic_targets(self, batch_size: int, target_size: tuple[int, int], model_config: ModelConfig,
                          generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"depth": 0.5 + 4.0 * torch.rand(batch_size, 1, *target_size, generator=generator)}

    def sample_maps(self, fields: Mapping[str, Any], grid: MapGrid) -> dict[str, torch.Tensor]:
        """Depth in metres divided by the crop's zoom (docs/augmentation.md); 0 without depth."""
        if fields["depth_mm"] is None:
            return {"depth": torch.zeros(1, len(grid.rows), len(grid.cols))}
        return {"depth": grid.gather(fields["depth_mm"]).to(torch.float32) * (0.001 / grid.geom.zoom)}

    def sample_maps_batched(self, batch: Mapping[str, Any], grid: BatchGrid) -> dict[str, torch.Tensor]:
        dev, (h, w) = grid.device, grid.size
        if "raw_depth" not in batch:
            return {"depth": torch.zeros(len(grid.geoms), 1, h, w, device=dev)}
        d_bi, d_rows, d_cols = grid.device_index
        scale = torch.tensor([[0.001 / g.zoom] for g in grid.geoms], dtype=torch.float64).to(torch.float32).to(dev)
        # uint16 has few device kernels: gather its bits as int16, then read them back unsigned.
        raw_depth = batch["raw_depth"].view(torch.int16).to(dev, non_blocking=True)
        mm = raw_depth[d_bi, 0, d_rows, d_cols].to(torch.int32).bitwise_and_(0xFFFF).to(torch.float32)
        return {"depth": mm.mul_(scale[:, 0, None, None]).unsqueeze(1)}


DEPTH = DepthTask()

__all__ = ["DEPTH", "DepthTask", "DEPTH_CHANNELS", "DEPTH_MIN", "DEPTH_MAX", "BERHU_FRACTION", "depth_loss"]
