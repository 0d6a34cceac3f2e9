"""Box arithmetic for SSD: format conversion, IoU, prior matching and box (de)coding — batched, on any device.

Called by the criterion (`match_priors`, `encode_boxes`) and by post-processing (`decode_boxes`). All functions are
vectorised over the whole padded batch (no per-image Python loop) and never modify their inputs in place (the
reference decoder overwrote the network's box tensor).

Conventions: boxes are normalised to [0, 1] w.r.t. the network input; "xyxy" is (x0, y0, x1, y1), "cxcywh" is
(centre x, centre y, width, height). Priors are P x 4 cxcywh (see `priors.make_priors`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rock_dist.model.priors import VARIANCE_WH, VARIANCE_XY

# Positive / background IoU thresholds of the matching (docs/architecture.md).
POSITIVE_IOU = 0.5
BACKGROUND_IOU = 0.4
# Label given to priors whose best IoU lies between the two thresholds: they take part in no loss.
IGNORE_LABEL = -1
# Smallest width/height used inside log(): keeps encodings finite for degenerate (zero-width) ground-truth boxes.
_MIN_SIZE = 1e-6


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre/size → (..., 4) corners."""
    cxcy, wh = boxes[..., :2], boxes[..., 2:]
    return torch.cat([cxcy - 0.5 * wh, cxcy + 0.5 * wh], dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corners → (..., 4) centre/size."""
    x0y0, x1y1 = boxes[..., :2], boxes[..., 2:]
    return torch.cat([0.5 * (x0y0 + x1y1), x1y1 - x0y0], dim=-1)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes with broadcasting batch dimensions.

    Shapes: boxes1 (..., N, 4), boxes2 (..., M, 4) → (..., N, M). Degenerate boxes give IoU 0, never NaN.
    """
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0).prod(dim=-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0).prod(dim=-1)
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union.clamp(min=1e-12)


def encode_boxes(boxes: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """SSD regression targets of xyxy boxes relative to cxcywh priors (variances 0.1 / 0.2).

    Shapes: boxes (..., P, 4) xyxy, priors (P, 4) cxcywh → (..., P, 4) offsets (dx, dy, dw, dh).
    """
    g = xyxy_to_cxcywh(boxes)
    p_xy, p_wh = priors[..., :2], priors[..., 2:]
    d_xy = (g[..., :2] - p_xy) / (VARIANCE_XY * p_wh)
    d_wh = torch.log(g[..., 2:].clamp(min=_MIN_SIZE) / p_wh) / VARIANCE_WH
    return torch.cat([d_xy, d_wh], dim=-1)


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_boxes`: (..., P, 4) offsets and (P, 4) cxcywh priors → (..., P, 4) xyxy boxes.

    Returns a new tensor; `loc` is left untouched.
    """
    loc = loc.to(priors.dtype)
    xy = priors[..., :2] + loc[..., :2] * VARIANCE_XY * priors[..., 2:]
    wh = priors[..., 2:] * torch.exp(loc[..., 2:] * VARIANCE_WH)
    return torch.cat([xy - 0.5 * wh, xy + 0.5 * wh], dim=-1)


class MatchResult(NamedTuple):
    """Per-prior targets of a batch.

    labels: B x P int64 — class id of the matched box for positives, 0 for background, IGNORE_LABEL (-1) between
    the thresholds. boxes: B x P x 4 xyxy box matched to each prior (meaningful for positives only).
    iou: B x P best IoU of each prior (2.0 for priors forced onto a box as its best prior).
    """

    labels: torch.Tensor
    boxes: torch.Tensor
    iou: torch.Tensor


def match_priors(gt_boxes: torch.Tensor, gt_labels: torch.Tensor, priors: torch.Tensor,
                 positive_iou: float = POSITIVE_IOU, background_iou: float = BACKGROUND_IOU) -> MatchResult:
    """Assign ground-truth boxes to priors for a whole padded batch at once, on the boxes' device.

    gt_boxes: B x M x 4 normalised xyxy; gt_labels: B x M int64 with 0 = padding; priors: P x 4 cxcywh.
    A prior is positive (the label of its best box) at IoU >= `positive_iou`, background below `background_iou`,
    ignored in between; in addition every real box claims its own best prior, whatever the IoU (if two boxes share a
    best prior, the later box in the list keeps it, as in the reference). Images without boxes (all padding, or
    M = 0) get only background priors.
    """
    B, M = gt_labels.shape
    P = priors.shape[0]
    device = gt_boxes.device
    priors = priors.to(device=device, dtype=torch.float32)
    gt_boxes = gt_boxes.to(torch.float32)
    valid = gt_labels > 0  # B x M
    if M == 0:
        # No box in the whole batch: nothing to gather from; every prior is background.
        return MatchResult(torch.zeros(B, P, dtype=torch.long, device=device),
                           torch.zeros(B, P, 4, device=device), torch.zeros(B, P, device=device))

    iou = box_iou(gt_boxes, cxcywh_to_xyxy(priors))  # B x M x P
    # Padding rows must never win a max: -1 is below any real IoU.
    iou = torch.where(valid[:, :, None], iou, torch.full_like(iou, -1.0))

    best_iou, best_gt = iou.max(dim=1)  # per prior: B x P
    best_prior = iou.argmax(dim=2)  # per box: B x M

    # Force each real box onto its best prior. scatter_reduce(amax) over the box index is deterministic on every
    # device and lets the later box win a shared prior; padding contributes -1 and so never overrides.
    box_index = torch.arange(M, device=device).expand(B, M)
    forced = torch.full((B, P), -1, dtype=torch.long, device=device)
    forced = forced.scatter_reduce(1, best_prior, torch.where(valid, box_index, -1), reduce="amax", include_self=True)
    is_forced = forced >= 0
    best_gt = torch.where(is_forced, forced, best_gt)
    best_iou = torch.where(is_forced, torch.full_like(best_iou, 2.0), best_iou)

    labels = gt_labels.gather(1, best_gt)
    labels = torch.where(best_iou >= positive_iou, labels,
                         torch.where(best_iou < background_iou, torch.zeros_like(labels),
                                     torch.full_like(labels, IGNORE_LABEL)))
    # A prior whose best "box" was padding (image without boxes) has IoU -1 < background: label 0 already.
    boxes = gt_boxes.gather(1, best_gt[:, :, None].expand(B, P, 4))
    return MatchResult(labels, boxes, best_iou)


__all__ = [
    "POSITIVE_IOU", "BACKGROUND_IOU", "IGNORE_LABEL", "cxcywh_to_xyxy", "xyxy_to_cxcywh", "box_iou", "encode_boxes",
    "decode_boxes", "MatchResult", "match_priors",
]
