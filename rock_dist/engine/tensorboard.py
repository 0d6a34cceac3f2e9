"""What the training run logs besides its losses: the scalar val metrics and the pictures of predictions.

Called by `rock_dist.engine.trainer`, which sends both to the experiment trackers (`engine.trackers`: TensorBoard,
W&B, MLflow) on the main process only. Pictures come from `rock_dist.engine.visualize`, which takes tensors on any
device and returns CPU uint8, so logging works the same on CPU and GPU runs (the reference's grids assumed CUDA).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Mapping, Sequence

import torch

from rock_dist.config import LossConfig
from rock_dist.tasks import registry

if TYPE_CHECKING:
    from rock_dist.model.detector import ROCKDetector


def eval_metric_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar entries of an `evaluate` result (lists such as the 12 COCO stats are left out)."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            out[name] = float(value)
    return out


def _grid(pictures: Sequence[torch.Tensor]) -> torch.Tensor:
    from torchvision.utils import make_grid

    return make_grid(torch.stack(list(pictures)), nrow=len(pictures), padding=2, pad_value=255)


@torch.no_grad()
def prediction_pictures(model: ROCKDetector, images_uint8: torch.Tensor, images_input: torch.Tensor,
                        batch: Mapping[str, torch.Tensor], *, class_names: Sequence[str],
                        scene_types: Sequence[str], loss_config: LossConfig, max_images: int = 4,
                        autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext
                        ) -> dict[str, torch.Tensor]:
    """Grids of predictions and ground truth for the first `max_images` images of a training batch.

    model: the unwrapped detector (run here in eval mode, then put back in its previous mode); images_uint8:
    B x 3 x H x W uint8 network-size images (CPU); images_input: the same, normalised, on the model's device;
    batch: the prepared batch (ground truth). Returns name -> uint8 3 x H' x W' CPU grids, one row of images each:
    detections, ground_truth, and the pictures of each trained task (`AuxTask.pictures`: depth_pred/depth_gt,
    normals_pred/normals_gt, scene).
    """
    from rock_dist.engine import visualize

    n = min(max_images, images_input.shape[0])
    was_training = model.training
    model.eval()
    try:
        with autocast():
            outputs = model(images_input[:n])
        outputs = {k: v.float() for k, v in outputs.items()}
        detections = model.postprocess(outputs, score_threshold=loss_config.score_threshold,
                                       nms_iou=loss_config.nms_iou, max_detections=loss_config.max_detections)
    finally:
        model.train(was_training)

    h, w = images_uint8.shape[-2:]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    out: dict[str, list[torch.Tensor]] = {"detections": [], "ground_truth": []}
    for i in range(n):
        det = detections[i]
        out["detections"].append(visualize.draw_detections(
            images_uint8[i], det["boxes"].float().cpu() * scale, det["labels"], det["scores"], class_names))
        labels = batch["labels"][i].cpu()
        keep = labels > 0
        out["ground_truth"].append(visualize.draw_detections(
            images_uint8[i], batch["boxes"][i].float().cpu()[keep] * scale, labels[keep],
            torch.ones(int(keep.sum())), class_names))
        for task in registry.all_tasks():  # each trained task draws its own pictures (rock_dist.tasks)
            if task.name in outputs:
                for name, picture in task.pictures(outputs[task.name], batch, i, image=images_uint8[i],
                                                   scene_types=scene_types).items():
                    out.setdefault(name, []).append(picture)
    return {name: _grid(pics) for name, pics in out.items() if pics}


__all__ = ["eval_metric_scalars", "prediction_pictures"]
