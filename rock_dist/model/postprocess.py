"""Detection decoding: network outputs → per-image boxes, scores and labels, with one batched NMS on the device.

Called by `ROCKDetector.postprocess` (evaluation, detection, TensorBoard, benchmarks). Steps (docs/architecture.md):
softmax over classes; per image and class keep the 200 best-scoring priors (the reference's pre-NMS cap) above the
score threshold; per-class NMS at IoU 0.3 for all images and classes in ONE `torchvision.ops.nms` call; keep the best
`max_detections` per image. Nothing loops over images or priors in Python except splitting the final result into
the per-image list, and the network's tensors are never modified.
"""

from __future__ import annotations

import torch
from torchvision.ops import nms

from rock_dist.model.boxes import decode_boxes

# Candidates per image and class before NMS (reference: 200).
PRE_NMS_TOP_K = 200


# Largest candidate count given to one NMS call: CUDA NMS keeps an N x N/64 bit mask (16384 → 32 MiB).
NMS_CHUNK = 16384


def _chunked_nms(boxes: torch.Tensor, scores: torch.Tensor, image_idx: torch.Tensor, iou: float,
                 num_images: int) -> torch.Tensor:
    """`nms` over all candidates, split into runs of whole images when there are more than NMS_CHUNK of them.

    Groups never span images, so splitting by image is exact. Returns indices into `boxes` (any order).
    """
    n = boxes.shape[0]
    if n <= NMS_CHUNK:
        return nms(boxes, scores, iou)
    # Candidates are ordered by image (they come from a B x ... tensor), so each image is a contiguous run.
    ends = torch.cumsum(torch.bincount(image_idx, minlength=num_images), 0).tolist()
    kept, start, last_end = [], 0, 0
    for end in ends:
        if end - start > NMS_CHUNK and last_end > start:
            kept.append(start + nms(boxes[start:last_end], scores[start:last_end], iou))
            start = last_end
        last_end = end
    kept.append(start + nms(boxes[start:last_end], scores[start:last_end], iou))
    return torch.cat(kept)


@torch.no_grad()
def postprocess_detections(loc: torch.Tensor, conf: torch.Tensor, priors: torch.Tensor, *,
                           score_threshold: float = 0.05, nms_iou: float = 0.3, max_detections: int = 100,
                           pre_nms_top_k: int = PRE_NMS_TOP_K) -> list[dict[str, torch.Tensor]]:
    """Decode a batch of predictions.

    loc B x P x 4 offsets, conf B x P x C logits (class 0 = background), priors P x 4 cxcywh.
    Returns per image {"boxes": K x 4 normalised xyxy clipped to [0, 1], "scores": K, "labels": K int64 in 1..C-1},
    sorted by decreasing score, K <= max_detections; on the input's device.
    """
    B, P, C = conf.shape
    device = conf.device
    boxes = decode_boxes(loc.float(), priors.to(device=device, dtype=torch.float32)).clamp(0.0, 1.0)  # B x P x 4
    probs = torch.softmax(conf.float(), dim=-1)[..., 1:]  # B x P x (C-1): background dropped

    # Pre-NMS cap per image and class: top-k over the priors of each class.
    k = min(pre_nms_top_k, P)
    top_scores, top_prior = probs.transpose(1, 2).topk(k, dim=2)  # B x (C-1) x k
    image_idx = torch.arange(B, device=device)[:, None, None].expand_as(top_prior)
    label = torch.arange(1, C, device=device)[None, :, None].expand_as(top_prior)
    keep = top_scores > score_threshold
    scores, image_idx, label, prior_idx = top_scores[keep], image_idx[keep], label[keep], top_prior[keep]
    cand_boxes = boxes[image_idx, prior_idx]  # N x 4

    # One NMS for every (image, class) group: shift each group to its own region so that boxes of different groups
    # never overlap. Boxes are clipped to [0, 1], so an offset of 2 per group separates them; float64 keeps the
    # shifted coordinates exact to ~1e-13 even for thousands of groups.
    group = image_idx * C + label
    shifted = cand_boxes.double() + (group.double() * 2.0)[:, None]
    kept = _chunked_nms(shifted, scores.double(), image_idx, nms_iou, B)

    # Best `max_detections` per image: sort by score, then stably by image, so each image's run is score-ordered.
    kept = kept[torch.sort(scores[kept], descending=True, stable=True).indices]
    kept = kept[torch.sort(image_idx[kept], stable=True).indices]
    kept_image = image_idx[kept]
    counts = torch.bincount(kept_image, minlength=B)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(kept.numel(), device=device) - starts[kept_image]
    kept = kept[rank < max_detections]
    counts = counts.clamp(max=max_detections)

    out_boxes, out_scores, out_labels = cand_boxes[kept], scores[kept], label[kept]
    sizes = counts.tolist()  # the one host synchronisation
    return [{"boxes": b, "scores": s, "labels": lab}
            for b, s, lab in zip(out_boxes.split(sizes), out_scores.split(sizes), out_labels.split(sizes))]


__all__ = ["postprocess_detections", "PRE_NMS_TOP_K"]
