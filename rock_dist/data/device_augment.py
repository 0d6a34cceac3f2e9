"""The training augmentation's explicit batched step (`--augment_on`), run in the training process on the training
device (CPU or CUDA) between the loader and `rock_dist.data.batch.prepare_batch`.

Called by `rock_dist.data.pipeline.TrainStream`, which maps `BatchAugment` over every training batch (after
`rock_dist.data.device_decode` when JPEGs are decoded on the GPU), and by the data benchmark. Two kinds of batches
arrive (docs/augmentation.md, docs/data_pipeline.md):

- `--augment_on workers`: the workers cropped, flipped and resized each sample and built its targets, and only drew the
  colour jitter (batch key `color_jitter`, B x 8). This step moves the images to the device and applies the jitter there
  (`transforms.apply_color_jitter`): the costliest CPU operation, ~free on a GPU.
- `--augment_on device`: the workers only decoded and drew every random parameter with the same RNG draws as the
  per-sample path (crop, flip, jitter: resume and exact replay are unchanged), and shipped the decoded sample
  (`raw_image` and each map task's stored maps under its `raw_keys`, e.g. `raw_depth`, `raw_normals`, `raw_mask`,
  zero-padded to the largest size in the batch, each sample's own size in `orig_size`), its crop and flip
  (`augment_geometry`, B x 5: x0, y0, x1, y1, flip) and the crop's kept-box mask (`box_keep`). This step does the rest
  batched:
  * RGB: crop + flip + resize as two separable resampling passes (rows, then columns), each a few gathers with
    per-sample taps and weights computed on the host: the antialiased bilinear filter of the workers' resize (torch's
    antialias=True weights, so upscaling is plain bilinear and downscaling is filtered, as in the workers), rounded to
    uint8. It differs from the workers' uint8 resize by float rounding only (at most 1 grey level;
    tests/test_device_augment.py). Gathering by index instead of one `grid_sample` keeps the crop's edges clamped
    exactly as the per-sample crop-then-resize does and never materialises a B x H x W x 2 sampling grid.
  * the auxiliary tasks' dense maps (depth, normals, ...): nearest sampling at pixel centres with
    `transforms.centre_indices` (the workers' indices, so the values are exactly the workers'), given to each map task
    (`AuxTask.sample_maps_batched`, rock_dist.tasks) as a `BatchGrid`; the task applies its zoom, flip (the normals' x
    negated) and renormalisation in the same float32 operations as its per-sample `sample_maps`. The normals mask is
    gathered on the HOST from the host batch, because `engine.normalization.micro_batch_counts` counts its valid pixels
    on the host before the step (reading it back from the device would add a synchronisation).
  * boxes: clipped to the crop, re-normalised, flipped and filtered as padded B x M tensors with `box_keep` (kept boxes
    first in their order, label 0 after them: the padding of `collate`), on the device; prior matching then runs batched
    on the device in the criterion (`model.losses`, `boxes.match_priors`), as for every batch.
  Then the colour jitter as above. The result has exactly the keys and shapes of a workers batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch

from rock_dist.data.transforms import Geometry, apply_color_jitter, centre_indices
from rock_dist.config import placement_conflict
from rock_dist.errors import ConfigError
from rock_dist.tasks import registry
from rock_dist.tasks.base import BatchGrid

Size = tuple[int, int]
AugmentOn = Literal["workers", "device", "auto"]


@dataclass(frozen=True)
class Placement:
    """Where the augmentation runs: geometry and targets in the loader `workers` or batched on the `device`, and
    the training `device` the batched step (at least the colour jitter) runs on."""

    where: Literal["workers", "device"]
    device: torch.device


def resolve_augment_on(requested: AugmentOn | Placement, device: torch.device | str | None = None, *,
                       color_jitter: str = "device", decode_device: str = "cpu") -> Placement:
    """The placement for `--augment_on` on the training `device` (None: the current CUDA device when there is one,
    else the CPU). ConfigError for a combination that cannot work."""
    if not isinstance(requested, Placement) and requested not in ("workers", "device", "auto"):
        raise ConfigError(f"--augment_on {requested!r}: use workers, device or auto")
    conflict = placement_conflict(color_jitter, decode_device,
                                  requested.where if isinstance(requested, Placement) else requested)
    if conflict is not None:
        raise ConfigError(conflict)
    if isinstance(requested, Placement):
        return requested
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if requested == "device":
        return Placement("device", device)
    # auto: on a CPU the training process and the loader workers share the same cores, so moving work from the
    # workers into the training process only moves it to a busier place (and the padded full-size maps cost IPC);
    # on a GPU the batched step is nearly free and the workers' cores are what limits loader-bound runs.
    on_gpu = requested == "auto" and device.type == "cuda" and color_jitter != "cpu" and decode_device == "cpu"
    return Placement("device" if on_gpu else "workers", device)


# ----------------------------------------------------------------------------------------------------------- RGB
def resize_taps(start: torch.Tensor, length: torch.Tensor, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices (int64 B x out x K) and weights (float32, same shape) that resize the spans
    [start, start + length) of each row to `out` samples with torch's antialiased bilinear filter
    (`F.interpolate(..., antialias=True)`: a triangle of half-width max(1, scale) at the output pixel's centre,
    normalised). Host arithmetic in float64; K is the most taps any row needs (unused taps have weight 0)."""
    scale = length.to(torch.float64) / out  # B
    support = scale.clamp(min=1.0)
    centre = scale[:, None] * (torch.arange(out, dtype=torch.float64) + 0.5)[None]  # B x out
    lo = (centre - support[:, None] + 0.5).trunc().clamp(min=0).long()
    hi = torch.minimum((centre + support[:, None] + 0.5).trunc().long(), length[:, None])
    taps = hi - lo
    k = torch.arange(int(taps.max()))
    x = (k[None, None] + lo[..., None] - centre[..., None] + 0.5) / support[:, None, None]
    w = (1.0 - x.abs()).clamp(min=0.0) * (k[None, None] < taps[..., None])
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    idx = torch.minimum(lo[..., None] + k, (length - 1)[:, None, None]) + start[:, None, None]
    return idx, w.to(torch.float32)


def _resample(raw: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor], cols: tuple[torch.Tensor, torch.Tensor]
              ) -> torch.Tensor:
    """uint8 B x 3 x H x W from uint8 B x 3 x Hp x Wp: rows pass then columns pass of (index, weight) taps."""
    b = torch.arange(raw.shape[0], device=raw.device)[:, None]
    ridx, rw = rows
    src = raw.permute(0, 2, 1, 3)  # B x Hp x 3 x Wp: a row gather moves whole rows
    acc = torch.zeros(raw.shape[0], ridx.shape[1], raw.shape[1], raw.shape[3], device=raw.device)
    for k in range(ridx.shape[2]):
        acc.add_(src[b, ridx[:, :, k]].to(torch.float32).mul_(rw[:, :, k, None, None]))
    cidx, cw = cols
    src = acc.permute(0, 3, 1, 2)  # B x Wp x H x 3
    out = torch.zeros(raw.shape[0], cidx.shape[1], ridx.shape[1], raw.shape[1], device=raw.device)
    for k in range(cidx.shape[2]):
        out.add_(src[b, cidx[:, :, k]].mul(cw[:, :, k, None, None]))
    return out.permute(0, 3, 2, 1).round_().clamp_(0.0, 255.0).to(torch.uint8).contiguous()


# ------------------------------------------------------------------------------------------------------ the step
class BatchAugment:
    """The batched augmentation step on `device` (see the module docstring): a workers batch gets its colour jitter,
    a deferred batch its crop, flip, resize, targets and jitter. Batches with nothing left to do pass through."""

    def __init__(self, device: torch.device | str, image_size: Size, target_size: Size) -> None:
        self.device = torch.device(device)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.target_size = (int(target_size[0]), int(target_size[1]))

    def __call__(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        out = self.geometry(batch) if "augment_geometry" in batch else dict(batch)
        jitter = out.pop("color_jitter", None)
        if jitter is not None:
            # uint8 in, uint8 out: the jitter rounds once, so prepare_batch normalises the same values it did when
            # it applied the jitter itself.
            out["images"] = apply_color_jitter(out["images"].to(self.device, non_blocking=True), jitter)
        return out

    def geometry(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Crop, flip, resize and targets of a deferred batch (colour jitter left in `color_jitter`)."""
        dev = self.device
        raw_keys = _raw_keys()
        out = {k: v for k, v in batch.items() if k not in raw_keys}
        geo = batch["augment_geometry"]  # host data, as are all the per-sample numbers derived from it below
        x0, y0, x1, y1, flip = geo.unbind(1)
        flip = flip.bool()
        geoms = [Geometry.from_row(row, size) for row, size in zip(geo.tolist(), batch["orig_size"].tolist())]
        B = len(geoms)

        H, W = self.image_size
        ridx, rw = resize_taps(y0, y1 - y0, H)
        cidx, cw = resize_taps(x0, x1 - x0, W)
        # Flip: resizing is symmetric, so the flipped crop's resize is the crop's resize read backwards.
        cidx = torch.where(flip[:, None, None], cidx.flip(1), cidx)
        cw = torch.where(flip[:, None, None], cw.flip(1), cw)
        raw = batch["raw_image"].to(dev, non_blocking=True)
        out["images"] = _resample(raw, (ridx.to(dev), rw.to(dev)), (cidx.to(dev), cw.to(dev)))

        h, w = self.target_size
        rows = centre_indices(y0, y1 - y0, h, torch.zeros_like(flip))[:, :, None]  # B x h x 1
        cols = centre_indices(x0, x1 - x0, w, flip)[:, None, :]  # B x 1 x w
        bi = torch.arange(B)[:, None, None]
        grid = BatchGrid((bi, rows, cols), (bi.to(dev), rows.to(dev), cols.to(dev)), geoms, dev, (h, w))
        for task in registry.all_tasks():
            if task.target_kind == "map":
                out.update(task.sample_maps_batched(batch, grid))

        out["boxes"], out["labels"] = _crop_flip_boxes(batch, geoms, flip, dev)
        return out


def _raw_keys() -> tuple[str, ...]:
    """Keys only an undecoded-geometry batch carries: the image's, the map tasks' stored maps, the parameters."""
    maps = tuple(key for task in registry.all_tasks() for key in task.raw_keys.values())
    return ("raw_image", *maps, "augment_geometry", "box_keep")


def _crop_flip_boxes(batch: Mapping[str, Any], geoms: list[Geometry], flip: torch.Tensor, dev: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes clipped to each crop, re-normalised, flipped and filtered (kept first, zeros and label 0 after), as
    `transforms.crop_boxes` / `flip_boxes` / `collate` do per sample, in the same float32 operations."""
    # The crop's corners in normalised coordinates, divided in float64 like the per-sample Python floats.
    corners = torch.tensor([[g.x0 / g.image_size[1], g.y0 / g.image_size[0], g.x1 / g.image_size[1],
                             g.y1 / g.image_size[0]] for g in geoms], dtype=torch.float64).to(torch.float32)
    lo = corners[:, [0, 1, 0, 1]][:, None].to(dev)
    hi = corners[:, [2, 3, 2, 3]][:, None].to(dev)
    boxes = batch["boxes"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    keep = batch["box_keep"].to(dev, non_blocking=True)
    boxes = (torch.minimum(torch.maximum(boxes, lo), hi) - lo) / (hi - lo)
    flipped = torch.stack([1.0 - boxes[..., 2], boxes[..., 1], 1.0 - boxes[..., 0], boxes[..., 3]], dim=-1)
    boxes = torch.where(flip.to(dev)[:, None, None], flipped, boxes).clamp_(0.0, 1.0)
    # Kept boxes first, in their order: a stable sort on the device (no host round trip for the counts).
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    keep = torch.gather(keep, 1, order)
    boxes = torch.gather(boxes, 1, order[..., None].expand(-1, -1, 4)) * keep[..., None]
    labels = torch.gather(labels, 1, order) * keep
    return boxes, labels


__all__ = ["AugmentOn", "Placement", "resolve_augment_on", "resize_taps", "BatchAugment"]
