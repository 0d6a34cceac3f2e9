"""The surface-normals task of the ROCK block: a normal per pixel of the auxiliary map (docs/losses.md,
docs/evaluation.md).

Registered in rock_dist.tasks.registry. Shard members `normals.png|npy` (uint8 RGB, v = 127.5 (n + 1)) and
`mask.png|npy` (uint8, 0 invalid), present together (docs/data_format.md), decoded to the fields `normals` and
`normals_mask` (None without them). Batch: `normals` float32 B x 3 x h x w (unit vectors), `normals_mask` bool B x 1 x h
x w (valid pixels) and `has_normals` bool B: dense maps sampled following the crop and flip; a horizontal flip negates
the x component and the crop's zoom scales x and y before renormalising (docs/augmentation.md). Head: the mean over each
group of 128 channels of a 3 x 128-channel task map (unnormalised). Loss: (1 - n̂·n) + ‖n̂ - n‖² over the valid pixels
of the batch; weight 30. Metrics: angle statistics over the valid pixels of the evaluated set.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rock_dist.data.members import aux_member, check_size
from rock_dist.errors import DataError
from rock_dist.tasks.base import AuxTask, Batch, BatchGrid, MapGrid, masked_mean, match_size, resize_nearest

if TYPE_CHECKING:
    from rock_dist.config import ModelConfig

# Channels of the task map per axis (reference): 3 x 128.
NORMALS_CHANNELS_PER_AXIS = 128
# Smallest predicted-normal norm used when normalising (reference).
NORMAL_EPS = 1e-5
NORMAL_ANGLE_THRESHOLDS: dict[str, float] = {"normals_11_25": 11.25, "normals_22_5": 22.5, "normals_30": 30.0}


def normals_loss(pred: torch.Tensor, normals: torch.Tensor, mask: torch.Tensor, has_normals: torch.Tensor
                 ) -> torch.Tensor:
    """Mean over valid pixels of the batch of (1 - n̂·n) + ‖n̂ - n‖², n̂ = pred / max(‖pred‖, 1e-5).

    pred B x 3 x h x w, normals B x 3 x h x w unit vectors, mask B x 1 x h x w (valid pixels), has_normals B.
    """
    pred = pred.float()
    size = tuple(pred.shape[-2:])
    normals = resize_nearest(normals, size).float()
    mask = resize_nearest(mask, size) > 0.5 if tuple(mask.shape[-2:]) != size else mask.bool()
    weights = (mask[:, 0] & has_normals.bool()[:, None, None]).float()
    normals = torch.where(weights[:, None] > 0, normals, torch.zeros_like(normals))  # finite where unused
    unit = pred / pred.norm(dim=1, keepdim=True).clamp(min=NORMAL_EPS)
    per_pixel = (1.0 - (unit * normals).sum(dim=1)) + ((unit - normals) ** 2).sum(dim=1)  # B x h x w
    return masked_mean(per_pixel, weights)


class NormalsTask(AuxTask):
    name = "normals"
    presence_key = "has_normals"
    target_keys = ("normals", "normals_mask")
    reference_weight = 30.0
    metric_names = {"normals_mean": "normals mean angle (deg)", "normals_median": "normals median angle (deg)",
                    "normals_11_25": "normals fraction under 11.25 deg",
                    "normals_22_5": "normals fraction under 22.5 deg", "normals_30": "normals fraction under 30 deg"}
    record_key = "normals_angles"
    target_kind = "map"
    decoded_fields = {"normals": None, "normals_mask": None}
    raw_keys = {"normals": "raw_normals", "normals_mask": "raw_mask"}

    def channels(self, num_scenes: int) -> int:
        return 3 * NORMALS_CHANNELS_PER_AXIS

    def predict(self, task_map: torch.Tensor) -> torch.Tensor:
        b, _, h, w = task_map.shape
        return task_map.reshape(b, 3, NORMALS_CHANNELS_PER_AXIS, h, w).mean(dim=2)

    def loss(self, prediction: torch.Tensor, batch: Batch, config: ModelConfig) -> torch.Tensor:
        return normals_loss(prediction, batch["normals"], batch["normals_mask"], batch["has_normals"])

    def count(self, batch: Batch) -> torch.Tensor | int:
        if "normals_mask" not in batch or "has_normals" not in batch:
            return 0
        return (batch["normals_mask"][:, 0].bool() & batch["has_normals"].bool()[:, None, None]).sum()

    def image_stats(self, prediction: torch.Tensor, batch: Batch) -> list[Any]:
        """The float32 array of angles (degrees) at the valid pixels, per image with any."""
        target = batch["normals"].float()
        predicted = match_size(prediction.float(), tuple(target.shape[-2:]))
        predicted = F.normalize(predicted, dim=1, eps=1e-12)
        target = F.normalize(target, dim=1, eps=1e-12)
        cosine = (predicted * target).sum(1).clamp(-1.0, 1.0)  # B x h x w
        angles = torch.rad2deg(torch.acos(cosine)).cpu()
        mask = batch["normals_mask"].bool().reshape(cosine.shape).cpu()
        mask &= batch["has_normals"].bool().cpu().view(-1, 1, 1)
        return [angles[i][mask[i]].numpy().astype(np.float32) if mask[i].any() else None
                for i in range(angles.shape[0])]

    def aggregate(self, records: Sequence[Any]) -> dict[str, float | int]:
        angles = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in records])
        out: dict[str, float | int] = {"normals_mean": math.fsum(angles.tolist()) / angles.size,
                                       "normals_median": float(np.median(angles))}
        for name, threshold in NORMAL_ANGLE_THRESHOLDS.items():
            out[name] = float(np.count_nonzero(angles < threshold)) / angles.size
        out["normals_pixels"] = int(angles.size)
        return out

    def format_metric(self, key: str, value: float) -> str:
        return f"{value:.2f}" if key in ("normals_mean", "normals_median") else super().format_metric(key, value)

    def pictures(self, prediction: torch.Tensor, batch: Batch, index: int, *, image: torch.Tensor,
                 scene_types: Sequence[str]) -> dict[str, torch.Tensor]:
        from rock_dist.engine.visualize import normals_to_rgb

        return {"normals_pred": normals_to_rgb(prediction[index]),
                "normals_gt": normals_to_rgb(batch["normals"][index], batch["normals_mask"][index])}

    def original_picture(self, prediction: torch.Tensor, size: tuple[int, int], *, image: torch.Tensor,
                         scene_types: Sequence[str]) -> torch.Tensor | None:
        from rock_dist.engine.visualize import normals_to_rgb

        normals = F.interpolate(prediction[None].float(), size=size, mode="bilinear", align_corners=False)
        return normals_to_rgb(normals[0])

    def decode(self, raw: Mapping[str, Any], size: tuple[int, int], loc: str) -> dict[str, Any]:
        normals = aux_member(raw, "normals", loc)
        mask = aux_member(raw, "mask", loc)
        if (normals is None) != (mask is None):
            raise DataError(f"{loc}: the normals and mask members must be present together")
        check_size(loc, "normals", normals, size)
        check_size(loc, "mask", mask, size)
        return {"normals": normals, "normals_mask": mask}

    def present(self, fields: Mapping[str, Any]) -> bool:
        return fields["normals"] is not None

    def synthetic_targets(self, batch_size: int, target_size: tuple[int, int], model_config: ModelConfig,
                          generator: torch.Generator) -> dict[str, torch.Tensor]:
        normals = F.normalize(torch.randn(batch_size, 3, *target_size, generator=generator), dim=1)
        return {"normals": normals, "normals_mask": torch.ones(batch_size, 1, *target_size, dtype=torch.bool)}

    def sample_maps(self, fields: Mapping[str, Any], grid: MapGrid) -> dict[str, torch.Tensor]:
        """Normals n = v / 127.5 - 1, x negated by a flip, (x / zx, y / zy) for the zoom, renormalised, 0 where
        the mask is invalid; zeros (and an all-invalid mask) without normals."""
        stored, stored_mask = fields["normals"], fields["normals_mask"]
        if stored is None or stored_mask is None:
            h, w = len(grid.rows), len(grid.cols)
            return {"normals": torch.zeros(3, h, w), "normals_mask": torch.zeros(1, h, w, dtype=torch.bool)}
        n = grid.gather(stored).to(torch.float32).div_(127.5).sub_(1.0)
        zx, zy = grid.geom.zoom_xy
        n[0].mul_((-1.0 if grid.geom.flip else 1.0) / zx)
        n[1].div_(zy)
        mask = grid.gather(stored_mask) > 0
        n = n / n.norm(dim=0, keepdim=True).clamp_(min=1e-6)
        return {"normals": n * mask, "normals_mask": mask}

    def sample_maps_batched(self, batch: Mapping[str, Any], grid: BatchGrid) -> dict[str, torch.Tensor]:
        dev, (h, w) = grid.device, grid.size
        if "raw_normals" not in batch or "raw_mask" not in batch:
            return {"normals": torch.zeros(len(grid.geoms), 3, h, w, device=dev),
                    "normals_mask": torch.zeros(len(grid.geoms), 1, h, w, dtype=torch.bool)}
        bi, rows, cols = grid.index
        d_bi, d_rows, d_cols = grid.device_index
        factors = torch.tensor([[(-1.0 if g.flip else 1.0) / g.zoom_xy[0], g.zoom_xy[1]] for g in grid.geoms],
                               dtype=torch.float64).to(torch.float32).to(dev)
        # The mask is gathered on the host: engine.normalization.micro_batch_counts counts its valid pixels there
        # before the step, and reading it back from the device would add a synchronisation.
        mask = (batch["raw_mask"][bi, 0, rows, cols] > 0).unsqueeze(1)
        raw_normals = batch["raw_normals"].to(dev, non_blocking=True)
        n = raw_normals.permute(0, 2, 3, 1)[d_bi, d_rows, d_cols].permute(0, 3, 1, 2)
        # Contiguous like the per-sample map: the norm below then sums its 3 channels in the same order.
        n = n.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)
        n[:, 0].mul_(factors[:, 0, None, None])
        n[:, 1].div_(factors[:, 1, None, None])
        n = n / n.norm(dim=1, keepdim=True).clamp_(min=1e-6)
        return {"normals": n * mask.to(dev, non_blocking=True), "normals_mask": mask}


NORMALS = NormalsTask()

__all__ = ["NORMALS", "NormalsTask", "NORMALS_CHANNELS_PER_AXIS", "NORMAL_EPS", "NORMAL_ANGLE_THRESHOLDS",
           "normals_loss"]
