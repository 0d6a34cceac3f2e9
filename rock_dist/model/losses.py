"""ROCKCriterion: SSD detection loss plus the masked auxiliary losses (scene, depth, normals), docs/losses.md.

Built by `builder.build_criterion`; called by the trainer and evaluation as `criterion(outputs, batch)`. Matching of
priors to boxes runs here, by default `boxes.match_priors` (vectorised over the padded batch on the batch's device);
the criterion takes its matcher as an argument, so the benchmark's reference recipe passes its per-image CPU matcher
(`engine.fast_path.match_per_image_on_cpu`) without touching this module. No loss uses data-dependent Python control
flow or host synchronisation, so the criterion can be compiled together with the model.

Returned components (all scalar tensors): `loss_loc` and `loss_conf` are the per-image box and class losses divided
by the image's positives and averaged over the batch (images without boxes count as 0); `loss_det` =
loc_weight * loss_loc + loss_conf (the reference's detection loss); `loss_scene`, `loss_depth`, `loss_normals` are the
UNweighted auxiliary losses of the trained tasks; `loss` = loss_det + Σ weight_t * loss_t; `num_pos` the number of
positive priors in the batch (detached).

Missing modalities: each auxiliary loss is a mean over only the samples that have it (has_scene / has_depth /
has_normals); a batch where no sample has a modality gives exactly 0 for it (finite, zero gradient).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from rock_dist.config import LossConfig, ModelConfig
from rock_dist.model.boxes import MatchResult, encode_boxes, match_priors
from rock_dist.model.priors import make_priors

# A prior matcher: (gt_boxes B x M x 4 xyxy, gt_labels B x M, priors P x 4 cxcywh) -> MatchResult of B x P tensors.
Matcher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], MatchResult]

# Depth targets are clamped to this range (metres) before the log (reference).
DEPTH_MIN, DEPTH_MAX = 1e-3, 10.0
# Smallest predicted-normal norm used when normalising (reference).
NORMAL_EPS = 1e-5
# berHu threshold as a fraction of the largest absolute residual in the batch (Laina et al. 2016).
BERHU_FRACTION = 0.2
# Weight of the negatives' summed loss relative to positives/negatives in the all-priors variant (reference).
ALL_PRIORS_NEG_SCALE = 5.0


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ values·weights / Σ weights, and exactly 0 when the weights sum to 0 (no NaN, no gradient)."""
    values = torch.where(weights > 0, values, torch.zeros_like(values))  # also drops NaN/inf of masked entries
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def _resize_nearest(target: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour resize of a B x C x h x w target to `size` = (h', w') (no-op when already that size)."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return F.interpolate(target.float(), size=size, mode="nearest")


def hard_negative_mask(loss: torch.Tensor, negative: torch.Tensor, num_neg: torch.Tensor) -> torch.Tensor:
    """B x P mask of the `num_neg[b]` highest-`loss` priors among the `negative` ones of each image b.

    loss B x P (>= 0), negative B x P bool, num_neg B int. Fewer negatives than asked: all of them.
    """
    # Non-negatives get -1 so they rank after every negative; the rank of each prior comes from one sort + scatter.
    ranked = torch.where(negative, loss, torch.full_like(loss, -1.0))
    order = ranked.argsort(dim=1, descending=True)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return negative & (rank < num_neg[:, None])


def detection_loss(loc: torch.Tensor, conf: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                   priors: torch.Tensor, *, neg_pos_ratio: int = 3, use_all_priors: bool = False,
                   matcher: Matcher = match_priors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SSD loss of a batch: (loss_loc, loss_conf, num_pos), each averaged over images as described in the module.

    loc B x P x 4, conf B x P x C, gt_boxes B x M x 4 normalised xyxy, gt_labels B x M (0 = padding), priors P x 4.
    Box loss: SmoothL1 (beta 1) summed over the 4 offsets of positive priors. Class loss: cross-entropy of positives
    plus the `neg_pos_ratio` x positives highest-loss background priors (hard negatives); with `use_all_priors`,
    every background prior instead, their sum weighted by 5 x positives / negatives. Ignored priors (IoU between
    the thresholds) take part in neither. `matcher` assigns boxes to priors (`boxes.match_priors` by default).
    """
    loc = loc.float()
    conf = conf.float()
    match = matcher(gt_boxes, gt_labels, priors)
    labels = match.labels  # B x P
    pos = labels > 0
    neg = labels == 0
    num_pos = pos.sum(dim=1)  # B
    num_pos_f = num_pos.float()

    # Box regression on positives. Targets of non-positives are finite but meaningless; `where` keeps them out.
    target = encode_boxes(match.boxes, priors.to(loc.device, torch.float32))
    box = F.smooth_l1_loss(loc, target, reduction="none", beta=1.0).sum(dim=2)
    loc_per_image = torch.where(pos, box, torch.zeros_like(box)).sum(dim=1)

    # Cross-entropy on the B x C x P layout (the head's native one). Ignored priors get target 0 and are masked.
    ce = F.cross_entropy(conf.transpose(1, 2), labels.clamp(min=0), reduction="none")  # B x P
    pos_ce = torch.where(pos, ce, torch.zeros_like(ce)).sum(dim=1)
    if use_all_priors:
        num_neg = neg.sum(dim=1).float()
        neg_sum = torch.where(neg, ce, torch.zeros_like(ce)).sum(dim=1)
        conf_per_image = pos_ce + ALL_PRIORS_NEG_SCALE * num_pos_f / num_neg.clamp(min=1.0) * neg_sum
    else:
        hard_neg = hard_negative_mask(ce.detach(), neg, neg_pos_ratio * num_pos)
        conf_per_image = pos_ce + torch.where(hard_neg, ce, torch.zeros_like(ce)).sum(dim=1)

    # Per image divided by its positives; images without positives contribute 0; then the mean over the batch.
    has_pos = num_pos > 0
    denom = num_pos_f.clamp(min=1.0)
    loss_loc = torch.where(has_pos, loc_per_image / denom, torch.zeros_like(denom)).mean()
    loss_conf = torch.where(has_pos, conf_per_image / denom, torch.zeros_like(denom)).mean()
    return loss_loc, loss_conf, num_pos.sum().detach()


def scene_loss(log_probs: torch.Tensor, scene: torch.Tensor, has_scene: torch.Tensor) -> torch.Tensor:
    """NLL of the scene log-probabilities B x S against ids B (-1 if missing), mean over samples that have one."""
    valid = has_scene.bool() & (scene >= 0)
    nll = -log_probs.float().gather(1, scene.clamp(min=0)[:, None]).squeeze(1)
    return _masked_mean(nll, valid.float())


def depth_loss(pred: torch.Tensor, depth: torch.Tensor, has_depth: torch.Tensor, kind: str = "smoothl1"
               ) -> torch.Tensor:
    """Loss between predicted log depth B x 1 x h x w and log(clamp(depth, 1e-3, 10)) of the target depth (metres).

    Every pixel of a sample with depth counts (hole-filled depths); samples without depth are left out.
    kind 'smoothl1' (reference) or 'berhu' (the paper: |r| up to c, (r² + c²) / 2c above, with c = 0.2 x the largest
    |r| over the samples with depth).
    """
    pred = pred.float()
    depth = _resize_nearest(depth, tuple(pred.shape[-2:]))
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
    return _masked_mean(per_pixel, weights)


def normals_loss(pred: torch.Tensor, normals: torch.Tensor, mask: torch.Tensor, has_normals: torch.Tensor
                 ) -> torch.Tensor:
    """Mean over valid pixels of the batch of (1 - n̂·n) + ‖n̂ - n‖², n̂ = pred / max(‖pred‖, 1e-5).

    pred B x 3 x h x w, normals B x 3 x h x w unit vectors, mask B x 1 x h x w (valid pixels), has_normals B.
    """
    pred = pred.float()
    size = tuple(pred.shape[-2:])
    normals = _resize_nearest(normals, size).float()
    mask = _resize_nearest(mask, size) > 0.5 if tuple(mask.shape[-2:]) != size else mask.bool()
    weights = (mask[:, 0] & has_normals.bool()[:, None, None]).float()
    normals = torch.where(weights[:, None] > 0, normals, torch.zeros_like(normals))  # finite where unused
    unit = pred / pred.norm(dim=1, keepdim=True).clamp(min=NORMAL_EPS)
    per_pixel = (1.0 - (unit * normals).sum(dim=1)) + ((unit - normals) ** 2).sum(dim=1)  # B x h x w
    return _masked_mean(per_pixel, weights)


class ROCKCriterion(nn.Module):
    """criterion(outputs, batch) → dict of scalar losses (see the module docstring).

    outputs: the detector's dict ("loc" B x P x 4, "conf" B x P x C, plus "scene"/"depth"/"normals" of the trained
    tasks). batch (docs/data_format.md, on the outputs' device): "boxes" B x M x 4, "labels" B x M, and for the trained
    tasks "scene" + "has_scene", "depth" + "has_depth", "normals" + "normals_mask" + "has_normals". `matcher` assigns
    the boxes to the priors (see `detection_loss`).
    """

    priors: torch.Tensor

    def __init__(self, config: ModelConfig, loss: LossConfig, matcher: Matcher = match_priors) -> None:
        super().__init__()
        self.config = config
        self.loss_config = loss
        self.matcher = matcher
        self.tasks: tuple[str, ...] = config.tasks
        self.register_buffer("priors", make_priors(config.image_size, config.backbone), persistent=False)

    def forward(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        lc = self.loss_config
        loc = outputs["loc"]
        priors = self.priors.to(loc.device)  # no-op once the criterion has been moved
        if priors.shape[0] != loc.shape[1]:
            raise ValueError(f"the model predicts {loc.shape[1]} priors but the criterion was built for "
                             f"{priors.shape[0]} (image size {self.config.image_size}): build both from one config")
        loss_loc, loss_conf, num_pos = detection_loss(
            loc, outputs["conf"], batch["boxes"], batch["labels"], priors, neg_pos_ratio=lc.neg_pos_ratio,
            use_all_priors=self.config.use_all_priors_conf_loss, matcher=self.matcher)
        loss_det = lc.loc_weight * loss_loc + loss_conf
        result = {"loss_loc": loss_loc, "loss_conf": loss_conf, "loss_det": loss_det}
        total = loss_det
        for task in self.tasks:  # static: fixed by the configuration
            if task not in outputs:
                raise KeyError(f"the criterion trains {task!r} but the model outputs have no {task!r}: build the "
                               "model and the criterion from the same ModelConfig")
            if task == "scene":
                value = scene_loss(outputs["scene"], batch["scene"], batch["has_scene"])
                weight = lc.scene_weight
            elif task == "depth":
                value = depth_loss(outputs["depth"], batch["depth"], batch["has_depth"], self.config.depth_loss)
                weight = lc.depth_weight
            else:
                value = normals_loss(outputs["normals"], batch["normals"], batch["normals_mask"],
                                     batch["has_normals"])
                weight = lc.normals_weight
            result[f"loss_{task}"] = value
            total = total + weight * value
        result["loss"] = total
        result["num_pos"] = num_pos
        return result


__all__ = ["Matcher", "ROCKCriterion", "detection_loss", "hard_negative_mask", "scene_loss", "depth_loss",
           "normals_loss"]
