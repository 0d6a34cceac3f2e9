"""ROCKCriterion: SSD detection loss plus the masked auxiliary losses of the trained tasks, docs/losses.md.

Built by `builder.build_criterion`; called by the training step as `criterion(outputs, batch, ratios, weights)` and
by evaluation as `criterion(outputs, batch)`. Matching of priors to boxes runs here, by default `boxes.match_priors`
(vectorised over the padded batch on the batch's device); the criterion takes its matcher as an argument, so the
benchmark's reference recipe passes its per-image CPU matcher (`engine.fast_path.match_per_image_on_cpu`) without
touching this module. No loss uses data-dependent Python control flow or host synchronisation, so the criterion can
be compiled together with the model.

The auxiliary tasks are those of rock_dist.tasks (one module each: its loss, its weight, what its loss counts); the
criterion takes them from the registry and composes the total in ONE place (`compose_losses`), the way DETR's
criterion owns its weight dict and its global normalisation: the training step passes each micro-batch's ratios
r = M x n_m / N from the global counts (rock_dist.engine.normalization) and this step's task weights
(rock_dist.engine.task_weighting).

Returned components (all scalar tensors): `loss_loc` and `loss_conf` are the per-image box and class losses divided
by the image's positives and averaged over the batch (images without boxes count as 0); `loss_det` =
loc_weight * loss_loc + loss_conf (the reference's detection loss); `loss_<task>` (e.g. `loss_scene`, `loss_depth`,
`loss_normals`) the UNweighted auxiliary losses of the trained tasks; each multiplied by its ratio when ratios are
given; `loss` = loss_det + Σ weight_t * loss_t; `num_pos` the number of positive priors in the batch (detached).

Missing modalities: each auxiliary loss is a mean over only the samples that have it (has_scene / has_depth /
has_normals); a batch where no sample has a modality gives exactly 0 for it (finite, zero gradient).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rock_dist.config import LossConfig, ModelConfig
from rock_dist.model.boxes import MatchResult, encode_boxes, match_priors
from rock_dist.model.priors import make_priors
from rock_dist.tasks import registry
from rock_dist.tasks.base import AuxTask
# The auxiliary losses live with their tasks; re-exported here, where the criterion's callers have found them.
from rock_dist.tasks.depth import depth_loss
from rock_dist.tasks.normals import normals_loss
from rock_dist.tasks.scene import scene_loss

# A prior matcher: (gt_boxes B x M x 4 xyxy, gt_labels B x M, priors P x 4 cxcywh) -> MatchResult of B x P tensors.
Matcher = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], MatchResult]

# Weight of the negatives' summed loss relative to positives/negatives in the all-priors variant (reference).
ALL_PRIORS_NEG_SCALE = 5.0


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


def compose_losses(components: Mapping[str, torch.Tensor], tasks: Sequence[str], weights: Mapping[str, float],
                   ratios: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """The total loss and the (re-weighted) components: THE composition of the training loss.

    components: `loss_loc`, `loss_conf`, `loss_det` and `loss_<task>` of the `tasks`, each normalised over its own
    micro-batch. ratios (None: all 1): per count key ("det" and each task) the factor M x n_m / N that turns the
    micro-batch's mean into its share of the global batch's mean (rock_dist.engine.normalization); summing a scaled
    component over the step's micro-batches and ranks and dividing by M gives its global-batch value (what the
    console and TensorBoard show). A ratio of exactly 1 leaves its components untouched, so a batch that is the
    whole global batch gives bit for bit loss_det + Σ weight_t x loss_t.
    """
    def scaled(value: torch.Tensor, key: str) -> torch.Tensor:
        ratio = 1.0 if ratios is None else ratios[key]
        return value if ratio == 1.0 else value * ratio

    out = {name: scaled(components[name], "det") for name in ("loss_loc", "loss_conf", "loss_det")
           if name in components}
    total = out["loss_det"]
    for task in tasks:  # static: fixed by the configuration
        out[f"loss_{task}"] = scaled(components[f"loss_{task}"], task)
        total = total + weights[task] * out[f"loss_{task}"]
    out["loss"] = total
    return out


class ROCKCriterion(nn.Module):
    """criterion(outputs, batch, ratios=None, weights=None) → dict of scalar losses (see the module docstring).

    outputs: the detector's dict ("loc" B x P x 4, "conf" B x P x C, plus one entry per trained task). batch
    (docs/data_format.md, on the outputs' device): "boxes" B x M x 4, "labels" B x M, and the keys of each trained
    task (its `presence_key` and `target_keys`). ratios: the global-batch ratios of `compose_losses` (None: this batch
    is the whole batch). weights: this step's task weights (None: `weight_dict`, the fixed ones of the LossConfig).
    `matcher` assigns the boxes to the priors (see `detection_loss`).
    """

    priors: torch.Tensor

    def __init__(self, config: ModelConfig, loss: LossConfig, matcher: Matcher = match_priors) -> None:
        super().__init__()
        self.config = config
        self.loss_config = loss
        self.matcher = matcher
        self.tasks: tuple[str, ...] = config.tasks
        self.aux_tasks: tuple[AuxTask, ...] = registry.select(self.tasks)
        self.weight_dict: dict[str, float] = {task.name: task.weight(loss) for task in self.aux_tasks}
        self.register_buffer("priors", make_priors(config.image_size, config.backbone), persistent=False)

    def forward(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                ratios: Mapping[str, float] | None = None, weights: Mapping[str, float] | None = None
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
        components = {"loss_loc": loss_loc, "loss_conf": loss_conf, "loss_det": lc.loc_weight * loss_loc + loss_conf}
        for task in self.aux_tasks:  # static: fixed by the configuration
            if task.name not in outputs:
                raise KeyError(f"the criterion trains {task.name!r} but the model outputs have no {task.name!r}: "
                               "build the model and the criterion from the same ModelConfig")
            components[f"loss_{task.name}"] = task.loss(outputs[task.name], batch, self.config)
        result = compose_losses(components, self.tasks, self.weight_dict if weights is None else weights, ratios)
        result["num_pos"] = num_pos
        return result


__all__ = ["Matcher", "ROCKCriterion", "compose_losses", "detection_loss", "hard_negative_mask", "scene_loss",
           "depth_loss", "normals_loss"]
