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
    detections, ground_truth, and per trained task depth_pred/depth_gt, normals_pred/normals_gt, scene.
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
        if "depth" in outputs:
            pred_depth = outputs["depth"][i, 0].exp()  # the model predicts log depth
            gt_depth = batch["depth"][i, 0]
            # One colour scale for prediction and ground truth, so they can be compared by eye.
            valid = gt_depth[gt_depth > 0]
            lo, hi = (float(valid.min()), float(valid.max())) if valid.numel() else (None, None)
            out.setdefault("depth_pred", []).append(visualize.colorize_depth(pred_depth, min_depth=lo,
                                                                             max_depth=hi))
            out.setdefault("depth_gt", []).append(visualize.colorize_depth(gt_depth, min_depth=lo, max_depth=hi))
        if "normals" in outputs:
            out.setdefault("normals_pred", []).append(visualize.normals_to_rgb(outputs["normals"][i]))
            out.setdefault("normals_gt", []).append(visualize.normals_to_rgb(batch["normals"][i],
                                                                             batch["normals_mask"][i]))
        if "scene" in outputs:
            probs = outputs["scene"][i].exp()  # log-probabilities
            k = int(probs.argmax())
            name = scene_types[k] if k < len(scene_types) else str(k)
            out.setdefault("scene", []).append(visualize.scene_picture(images_uint8[i], name, float(probs[k])))
    return {name: _grid(pics) for name, pics in out.items() if pics}


__all__ = ["eval_metric_scalars", "prediction_pictures"]
