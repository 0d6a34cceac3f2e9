"""Matching, box coding and the criterion (rock_dist.model.boxes / losses) on tiny hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from rock_dist.config import LossConfig, ModelConfig
from rock_dist.model.boxes import (IGNORE_LABEL, box_iou, cxcywh_to_xyxy, decode_boxes, encode_boxes,
                                   match_priors)
from rock_dist.model.builder import build_criterion
from rock_dist.model.losses import (depth_loss, detection_loss, hard_negative_mask, normals_loss, scene_loss)
from rock_dist.model.priors import feature_map_sizes, make_priors

# Six priors (cx, cy, w, h): four quadrants, the whole image, and a flat box overlapping the top-left quadrant at
# IoU 0.45 (between the thresholds).
TINY_PRIORS = torch.tensor([
    [0.25, 0.25, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5],
    [0.5, 0.5, 1.0, 1.0], [0.25, 0.1125, 0.5, 0.225]])
GT_BOX = [0.0, 0.0, 0.5, 0.5]  # exactly prior 0


def _lse(xs: list[float]) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def _ce(logits: list[float], label: int) -> float:
    return _lse(logits) - logits[label]


def _smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


# ------------------------------------------------------------------------------------------------------- matching
def test_tiny_matching_thresholds() -> None:
    boxes = torch.tensor([[GT_BOX, [0, 0, 0, 0]]])
    labels = torch.tensor([[2, 0]])  # second row is padding
    match = match_priors(boxes, labels, TINY_PRIORS)
    assert match.labels.tolist() == [[2, 0, 0, 0, 0, IGNORE_LABEL]]
    torch.testing.assert_close(match.iou[0, 4:], torch.tensor([0.25, 0.45]))


def _random_boxes(gen: torch.Generator, b: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    xy = torch.rand(b, m, 2, generator=gen) * 0.8
    wh = torch.rand(b, m, 2, generator=gen) * 0.5 + 0.005
    boxes = torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=-1)
    labels = torch.randint(1, 20, (b, m), generator=gen)
    return boxes, labels


def test_matching_rules_on_a_padded_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    priors = make_priors((128, 160))
    boxes, labels = _random_boxes(gen, 3, 6)
    boxes[0, 0] = torch.tensor([0.40, 0.40, 0.41, 0.412])  # tiny box: its best IoU is far below 0.4
    labels[1, 4:] = 0  # padding rows...
    boxes[1, 4:] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # ...with boxes that would match everything if not masked
    labels[2] = 0  # an image without boxes
    match = match_priors(boxes, labels, priors)

    iou = box_iou(boxes, cxcywh_to_xyxy(priors))  # B x M x P
    valid = labels > 0
    for b in range(3):
        # Every real box keeps its own best prior, with its label and its coordinates.
        for m in range(6):
            if valid[b, m]:
                p = int(iou[b, m].argmax())
                assert match.labels[b, p] == labels[b, m]
                torch.testing.assert_close(match.boxes[b, p], boxes[b, m])
        best = torch.where(valid[b][:, None], iou[b], torch.full_like(iou[b], -1)).max(dim=0).values
        forced = match.iou[b] == 2.0
        assert torch.all(match.labels[b][~forced & (best >= 0.5)] > 0)
        assert torch.all(match.labels[b][~forced & (best < 0.4)] == 0)
        assert torch.all(match.labels[b][~forced & (best >= 0.4) & (best < 0.5)] == IGNORE_LABEL)
    assert torch.all(match.labels[2] == 0)
    # The padding whole-image box must not have produced positives all over image 1.
    assert (match.labels[1] > 0).sum() < priors.shape[0] // 4


def test_matching_batch_without_any_box() -> None:
    priors = make_priors((128, 160))
    for m in (0, 3):
        match = match_priors(torch.zeros(2, m, 4), torch.zeros(2, m, dtype=torch.long), priors)
        assert match.labels.shape == (2, priors.shape[0])
        assert torch.all(match.labels == 0)
        assert torch.isfinite(encode_boxes(match.boxes, priors)).all()


def test_encode_decode_round_trip() -> None:
    gen = torch.Generator().manual_seed(1)
    priors = make_priors((128, 160))
    boxes, labels = _random_boxes(gen, 2, 5)
    match = match_priors(boxes, labels, priors)
    offsets = encode_boxes(match.boxes, priors)
    decoded = decode_boxes(offsets, priors)
    pos = match.labels > 0
    assert pos.any()
    torch.testing.assert_close(decoded[pos], match.boxes[pos], rtol=0, atol=1e-5)
    # Hand value: a box equal to its prior encodes to zero offsets; a box twice as wide to log(2) / 0.2.
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(encode_boxes(torch.tensor([[0.4, 0.3, 0.6, 0.7]]), prior), torch.zeros(1, 4))
    torch.testing.assert_close(encode_boxes(torch.tensor([[0.3, 0.3, 0.7, 0.7]]), prior),
                               torch.tensor([[0.0, 0.0, math.log(2) / 0.2, 0.0]]))
    # Decoding leaves its input alone.
    before = offsets.clone()
    decode_boxes(offsets, priors)
    assert torch.equal(before, offsets)


# ------------------------------------------------------------------------------------------------- detection loss
def test_hard_negative_count_is_three_times_positives() -> None:
    gen = torch.Generator().manual_seed(2)
    loss = torch.rand(3, 500, generator=gen)
    negative = torch.rand(3, 500, generator=gen) > 0.1
    num_pos = torch.tensor([5, 0, 200])
    mask = hard_negative_mask(loss, negative, 3 * num_pos)
    counts = mask.sum(dim=1).tolist()
    assert counts == [15, 0, int(negative[2].sum())]  # image 2 has fewer than 600 negatives: all of them
    assert torch.all(mask <= negative)
    # The chosen ones are the hardest: every chosen negative has a loss >= every unchosen negative.
    chosen, rest = loss[0][mask[0]], loss[0][negative[0] & ~mask[0]]
    assert chosen.min() >= rest.max()

    # Same count inside the detection loss on real matching: 3 x positives among the background priors.
    priors = make_priors((128, 160))
    boxes, labels = _random_boxes(gen, 2, 3)
    match = match_priors(boxes, labels, priors)
    pos = (match.labels > 0).sum(dim=1)
    mask = hard_negative_mask(torch.rand(2, priors.shape[0], generator=gen), match.labels == 0, 3 * pos)
    assert mask.sum(dim=1).tolist() == (3 * pos).tolist()


def _tiny_prediction() -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
    loc = torch.full((2, 6, 4), 7.0)  # non-positive priors get absurd offsets: they must not count
    loc[0, 0] = torch.tensor([0.1, -0.2, 0.5, 2.0])
    logits = [[1, 0, 2], [0, 0, 0], [2, 0, 0], [0, 3, 0], [0, 1, 1], [0, 5, 5]]
    conf = torch.tensor([logits, logits], dtype=torch.float32)
    return loc, conf, logits


def test_detection_loss_by_hand() -> None:
    loc, conf, logits = _tiny_prediction()
    boxes = torch.tensor([[GT_BOX], [[0, 0, 0, 0]]])
    labels = torch.tensor([[2], [0]])  # image 1 has no box: contributes 0 but still counts in the batch mean
    loss_loc, loss_conf, num_pos = detection_loss(loc, conf, boxes, labels, TINY_PRIORS)

    loc_hand = sum(_smooth_l1(v) for v in (0.1, -0.2, 0.5, 2.0))  # target offsets are 0 (box == prior)
    neg = sorted((_ce(logits[p], 0) for p in (1, 2, 3, 4)), reverse=True)
    conf_hand = _ce(logits[0], 2) + sum(neg[:3])  # 1 positive → 3 hard negatives; prior 5 is ignored
    assert num_pos.item() == 1
    assert loss_loc.item() == pytest.approx(loc_hand / 2, rel=1e-6)
    assert loss_conf.item() == pytest.approx(conf_hand / 2, rel=1e-6)

    # All-priors variant: all 4 negatives, weighted by 5 x positives / negatives.
    _, loss_conf_all, _ = detection_loss(loc, conf, boxes, labels, TINY_PRIORS, use_all_priors=True)
    all_hand = _ce(logits[0], 2) + 5 * (1 / 4) * sum(_ce(logits[p], 0) for p in (1, 2, 3, 4))
    assert loss_conf_all.item() == pytest.approx(all_hand / 2, rel=1e-6)


def test_batch_without_boxes() -> None:
    loc, conf, _ = _tiny_prediction()
    loc.requires_grad_(True)
    conf.requires_grad_(True)
    for m in (0, 2):
        loss_loc, loss_conf, num_pos = detection_loss(loc, conf, torch.zeros(2, m, 4),
                                                      torch.zeros(2, m, dtype=torch.long), TINY_PRIORS)
        assert num_pos.item() == 0 and loss_loc.item() == 0 and loss_conf.item() == 0
        (loss_loc + loss_conf).backward()
        assert torch.isfinite(loc.grad).all() and torch.isfinite(conf.grad).all()


# ------------------------------------------------------------------------------------------------ auxiliary losses
def test_scene_loss_by_hand() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5], [3.0, 0.0, 0.0], [0.2, 0.1, 0.0]])
    log_probs = torch.log_softmax(logits, dim=1)
    loss = scene_loss(log_probs, torch.tensor([1, -1, 0]), torch.tensor([True, False, True]))
    hand = (_ce([1.0, 2.0, 0.5], 1) + _ce([0.2, 0.1, 0.0], 0)) / 2
    assert loss.item() == pytest.approx(hand, rel=1e-6)


def test_depth_losses_by_hand() -> None:
    pred = torch.tensor([[[[0.0, 1.0]]], [[[5.0, 5.0]]], [[[-8.0, 3.0]]]])  # 3 x 1 x 1 x 2
    depth = torch.tensor([[[[1.0, 20.0]]], [[[0.0, 0.0]]], [[[0.0, 2.0]]]])  # 20 → clamped to 10, 0 → 1e-3
    has = torch.tensor([True, False, True])
    residuals = [0.0 - 0.0, 1.0 - math.log(10), -8.0 - math.log(1e-3), 3.0 - math.log(2)]
    hand = sum(_smooth_l1(r) for r in residuals) / 4
    assert depth_loss(pred, depth, has).item() == pytest.approx(hand, rel=1e-6)

    c = 0.2 * max(abs(r) for r in residuals)
    berhu = sum(abs(r) if abs(r) <= c else (r * r + c * c) / (2 * c) for r in residuals) / 4
    assert depth_loss(pred, depth, has, "berhu").item() == pytest.approx(berhu, rel=1e-6)


def test_normals_loss_by_hand() -> None:
    pred = torch.zeros(2, 3, 1, 3)
    pred[0, :, 0, 0] = torch.tensor([2.0, 0.0, 0.0])  # → (1, 0, 0) vs (0, 1, 0): (1 - 0) + 2 = 3
    pred[0, :, 0, 1] = torch.tensor([0.0, 0.0, 5.0])  # → (0, 0, 1) vs (0, 0, 1): 0
    pred[0, :, 0, 2] = torch.tensor([1.0, 1.0, 1.0])  # masked pixel
    pred[1] = 9.0  # sample without normals
    normals = torch.zeros(2, 3, 1, 3)
    normals[0, :, 0, 0] = torch.tensor([0.0, 1.0, 0.0])
    normals[0, :, 0, 1] = torch.tensor([0.0, 0.0, 1.0])
    normals[0, :, 0, 2] = torch.tensor([-1.0, 0.0, 0.0])
    mask = torch.tensor([[[[True, True, False]]], [[[True, True, True]]]])
    loss = normals_loss(pred, normals, mask, torch.tensor([True, False]))
    assert loss.item() == pytest.approx(1.5, rel=1e-6)


def test_targets_at_another_size_are_resized_nearest() -> None:
    pred = torch.randn(2, 1, 4, 5)
    depth = torch.rand(2, 1, 4, 5) * 5 + 0.5
    big = depth.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 8 x 10, nearest-downsamples to `depth`
    has = torch.tensor([True, True])
    torch.testing.assert_close(depth_loss(pred, big, has), depth_loss(pred, depth, has))
    normals = torch.nn.functional.normalize(torch.randn(2, 3, 4, 5), dim=1)
    mask = torch.rand(2, 1, 4, 5) > 0.3
    pred_n = torch.randn(2, 3, 4, 5)

    def up(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    torch.testing.assert_close(normals_loss(pred_n, up(normals), up(mask), has),
                               normals_loss(pred_n, normals, mask, has))


# ----------------------------------------------------------------------------------------------------- criterion
def _fake_outputs_and_batch(gen: torch.Generator, cfg: ModelConfig, b: int = 2) -> tuple[dict, dict]:
    p = make_priors(cfg.image_size).shape[0]
    h, w = feature_map_sizes(cfg.image_size)[0]
    outputs = {
        "loc": torch.randn(b, p, 4, generator=gen), "conf": torch.randn(b, p, cfg.num_classes, generator=gen),
        "scene": torch.log_softmax(torch.randn(b, cfg.num_scenes, generator=gen), dim=1),
        "depth": torch.randn(b, 1, h, w, generator=gen), "normals": torch.randn(b, 3, h, w, generator=gen),
    }
    for v in outputs.values():
        v.requires_grad_(True)
    boxes, labels = _random_boxes(gen, b, 3)
    batch = {
        "boxes": boxes, "labels": labels, "scene": torch.randint(0, cfg.num_scenes, (b,), generator=gen),
        "depth": torch.rand(b, 1, h, w, generator=gen) * 5, "normals": torch.nn.functional.normalize(
            torch.randn(b, 3, h, w, generator=gen), dim=1),
        "normals_mask": torch.rand(b, 1, h, w, generator=gen) > 0.2,
        "has_scene": torch.ones(b, dtype=torch.bool), "has_depth": torch.ones(b, dtype=torch.bool),
        "has_normals": torch.ones(b, dtype=torch.bool),
    }
    return outputs, batch


def test_criterion_weights_and_keys() -> None:
    cfg = ModelConfig(backbone="resnet18", pretrained="none", image_size=(128, 160))
    criterion = build_criterion(cfg, LossConfig())
    outputs, batch = _fake_outputs_and_batch(torch.Generator().manual_seed(3), cfg)
    losses = criterion(outputs, batch)
    assert set(losses) == {"loss", "loss_det", "loss_loc", "loss_conf", "loss_scene", "loss_depth",
                           "loss_normals", "num_pos"}
    expected = (6 * losses["loss_loc"] + losses["loss_conf"] + 3 * losses["loss_scene"] + 3 * losses["loss_depth"]
                + 30 * losses["loss_normals"])
    torch.testing.assert_close(losses["loss"], expected)
    torch.testing.assert_close(losses["loss_det"], 6 * losses["loss_loc"] + losses["loss_conf"])

    baseline = build_criterion(ModelConfig(backbone="resnet18", image_size=(128, 160), no_rock=True), LossConfig())
    base = baseline({"loc": outputs["loc"], "conf": outputs["conf"]}, batch)
    assert set(base) == {"loss", "loss_det", "loss_loc", "loss_conf", "num_pos"}
    torch.testing.assert_close(base["loss"], losses["loss_det"])


def test_missing_modalities_do_not_contribute() -> None:
    cfg = ModelConfig(backbone="resnet18", pretrained="none", image_size=(128, 160))
    criterion = build_criterion(cfg, LossConfig())
    gen = torch.Generator().manual_seed(4)
    outputs, batch = _fake_outputs_and_batch(gen, cfg)
    # Sample 1 has nothing but boxes; its (absent) targets are garbage that must not leak in.
    batch["has_scene"][1] = batch["has_depth"][1] = batch["has_normals"][1] = False
    batch["scene"][1] = -1
    batch["depth"][1] = float("nan")
    batch["normals"][1] = float("nan")
    losses = criterion(outputs, batch)
    first = {k: v[:1].detach() for k, v in outputs.items()}
    alone = criterion(first, {k: v[:1] for k, v in batch.items()})
    for key in ("loss_scene", "loss_depth", "loss_normals"):
        assert torch.isfinite(losses[key])
        torch.testing.assert_close(losses[key], alone[key])
    losses["loss"].backward()
    for task in ("scene", "depth", "normals"):
        grad = outputs[task].grad
        assert torch.isfinite(grad).all()
        assert torch.all(grad[1] == 0) and torch.any(grad[0] != 0)

    # Nobody has any auxiliary modality: exactly 0, finite, no NaN gradients.
    outputs, batch = _fake_outputs_and_batch(gen, cfg)
    for flag in ("has_scene", "has_depth", "has_normals"):
        batch[flag][:] = False
    batch["depth"][:] = float("nan")
    losses = criterion(outputs, batch)
    for key in ("loss_scene", "loss_depth", "loss_normals"):
        assert losses[key].item() == 0.0
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(torch.isfinite(v.grad).all() for v in outputs.values())
