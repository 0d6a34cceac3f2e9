"""Joint augmentation: boxes follow the pixels, depth/normals follow the geometry, colour jitter matches torchvision."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from rock_dist.data.batch import collate, prepare_batch
from rock_dist.data.device_augment import BatchAugment
from rock_dist.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, DecodedSample, EvalTransform, Geometry,
                                       TrainTransform, adjust_hue, apply_color_jitter, color_jitter, decode_sample,
                                       sample_ssd_crop)
from rock_dist.errors import DataError

H, W = 96, 128  # stored image
OUT = (96, 128)  # network input: same size so that one stored pixel is at most ~3 output pixels after a crop
TARGET = (12, 16)
COLOURS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 4: (255, 255, 0)}
# Inclusive pixel boxes, non-overlapping, one per label.
RECTS = {1: (5, 8, 40, 50), 2: (60, 10, 120, 30), 3: (50, 55, 70, 90), 4: (90, 45, 125, 88)}


def _scene_sample(depth: bool = True, normals: bool = True) -> DecodedSample:
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    for label, (x0, y0, x1, y1) in RECTS.items():
        image[:, y0:y1 + 1, x0:x1 + 1] = torch.tensor(COLOURS[label], dtype=torch.uint8)[:, None, None]
    boxes_px = torch.tensor([RECTS[k] for k in sorted(RECTS)], dtype=torch.float32)
    boxes = boxes_px / torch.tensor([W, H, W, H], dtype=torch.float32)
    xs = torch.arange(W, dtype=torch.float32)[None, :].expand(H, W)
    ys = torch.arange(H, dtype=torch.float32)[:, None].expand(H, W)
    depth_mm = (1000 + 20 * xs + 5 * ys).round().to(torch.uint16)[None] if depth else None
    n = torch.tensor([0.6, -0.3, 0.74])
    n = n / n.norm()
    normals_u8 = ((n + 1) * 127.5).round().to(torch.uint8)[:, None, None].expand(3, H, W).contiguous()
    mask = torch.zeros(1, H, W, dtype=torch.uint8)
    mask[:, :, : W // 2] = 255  # left half valid
    return DecodedSample(key="s", image_id=7, image=image, boxes=boxes, labels=torch.tensor(sorted(RECTS)),
                         depth_mm=depth_mm, normals=normals_u8 if normals else None,
                         normals_mask=mask if normals else None, scene=3)


def _extent(image: torch.Tensor, colour: tuple[int, int, int]) -> tuple[int, int, int, int] | None:
    dist = (image.float() - torch.tensor(colour, dtype=torch.float32)[:, None, None]).abs().amax(0)
    ys, xs = torch.nonzero(dist < 60, as_tuple=True)
    if ys.numel() == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


@pytest.mark.parametrize("force_crops", [False, True])
def test_boxes_follow_pixels(force_crops: bool) -> None:
    transform = TrainTransform(OUT, TARGET, force_crops=force_crops, jitter="none")
    sample = _scene_sample()
    cropped = flipped = 0
    for seed in range(40):
        out = transform(sample, random.Random(seed))
        geom: Geometry = out["geometry"]
        cropped += (geom.x1 - geom.x0) < W
        flipped += geom.flip
        boxes, labels = out["boxes"], out["labels"]
        assert boxes.shape == (labels.shape[0], 4) and labels.shape[0] >= 1
        assert bool(((boxes >= 0) & (boxes <= 1)).all())
        assert bool((boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all())
        sx, sy = OUT[1] / (geom.x1 - geom.x0), OUT[0] / (geom.y1 - geom.y0)  # output px per stored px
        for box, label in zip(boxes.tolist(), labels.tolist()):
            ext = _extent(out["image"], COLOURS[label])
            assert ext is not None, f"seed {seed}: kept object {label} is not visible"
            px = [box[0] * OUT[1], box[1] * OUT[0], box[2] * OUT[1], box[3] * OUT[0]]
            # The box's far edge is one stored pixel short by convention (x1 / W), plus resampling blur.
            tol_x, tol_y = sx + 1.5, sy + 1.5
            assert abs(px[0] - ext[0]) <= tol_x and abs(px[2] - ext[2]) <= tol_x, (seed, label, px, ext, geom)
            assert abs(px[1] - ext[1]) <= tol_y and abs(px[3] - ext[3]) <= tol_y, (seed, label, px, ext, geom)
        # Every visible object whose centre lies inside the crop must have kept its box.
        for label, (x0, y0, x1, y1) in RECTS.items():
            cx, cy = 0.5 * (x0 + x1) / W, 0.5 * (y0 + y1) / H
            inside = geom.x0 / W < cx < geom.x1 / W and geom.y0 / H < cy < geom.y1 / H
            assert (label in labels.tolist()) == inside, (seed, label, geom)
    assert cropped > 20 and 5 < flipped < 35
    if force_crops:
        assert cropped == 40


def test_crop_sampling_matches_reference_distribution() -> None:
    boxes = _scene_sample().boxes
    rng = random.Random(0)
    none = 0
    for _ in range(800):
        crop = sample_ssd_crop(boxes, (H, W), rng)
        if crop is None:
            none += 1
            continue
        (x0, y0, x1, y1), keep = crop
        fx, fy = (x1 - x0) / W, (y1 - y0) / H
        assert abs(fx - fy) < 2.0 / H  # same fraction of both sides: the aspect ratio is kept
        assert 0.1 - 0.05 <= fx * fy <= 1.0
        assert bool(keep.any())
    assert none > 100  # 1 option in 8 is "no crop", more often taken when the IoU options fail 30 times
    # One box covering the image: every option finds a crop, so "no crop" is exactly 1 draw in 8 (~100 of 800).
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    none_full = sum(sample_ssd_crop(full, (H, W), rng) is None for _ in range(800))
    assert 60 < none_full < 145
    forced = [sample_ssd_crop(boxes, (H, W), rng, force_crops=True) for _ in range(200)]
    assert all(c is not None for c in forced)
    # Without boxes the reference never crops.
    assert sample_ssd_crop(torch.zeros(0, 4), (H, W), rng, force_crops=True) is None


def test_depth_and_normals_follow_geometry() -> None:
    transform = TrainTransform(OUT, TARGET, jitter="none")
    sample = _scene_sample()
    n_src = sample.normals[:, 0, 0].float() / 127.5 - 1
    seen_flip = seen_plain = False
    for seed in range(30):
        out = transform(sample, random.Random(seed))
        g: Geometry = out["geometry"]
        zx, zy = g.zoom_xy
        zoom = math.sqrt(zx * zy)
        th, tw = TARGET
        for i, j in [(0, 0), (th - 1, tw - 1), (th // 2, 3), (2, tw - 2)]:
            v = g.y0 + (i + 0.5) * (g.y1 - g.y0) / th  # continuous source coordinates of the target pixel centre
            u = g.x0 + (j + 0.5) * (g.x1 - g.x0) / tw
            if g.flip:
                u = g.x0 + g.x1 - u
            expected = (1000 + 20 * u + 5 * v) / 1000 / zoom
            # Nearest sampling: within one stored pixel of the exact centre.
            assert abs(float(out["depth"][0, i, j]) - expected) <= (20 + 5) / 1000 / zoom + 1e-4, (seed, i, j)
            valid = bool(out["normals_mask"][0, i, j])
            assert valid == (math.floor(u) < W // 2) or abs(u - W // 2) < 1.0
            n = out["normals"][:, i, j]
            if valid:
                want = torch.stack([n_src[0] * (-1 if g.flip else 1) / zx, n_src[1] / zy, n_src[2]])
                want = want / want.norm()
                assert torch.allclose(n, want, atol=2e-2), (seed, n, want)
                assert abs(float(n.norm()) - 1) < 1e-4
            else:
                assert bool((n == 0).all())
        seen_flip |= g.flip
        seen_plain |= not g.flip
    assert seen_flip and seen_plain


def test_flip_negates_normal_x_and_mirrors_maps() -> None:
    sample = _scene_sample()
    plain = EvalTransform(OUT, TARGET)(sample)
    # A flip with no crop: find one among seeds.
    t = TrainTransform(OUT, TARGET, jitter="none")
    for seed in range(500):
        out = t(sample, random.Random(seed))
        g = out["geometry"]
        if g.flip and (g.x0, g.y0, g.x1, g.y1) == (0, 0, W, H):
            break
    else:
        pytest.fail("no uncropped flip drawn")
    assert torch.equal(out["depth"], plain["depth"].flip(-1))
    assert torch.equal(out["normals_mask"], plain["normals_mask"].flip(-1))
    valid = out["normals_mask"][0]
    assert torch.allclose(out["normals"][0][valid], -plain["normals"][0].flip(-1)[valid])
    assert torch.allclose(out["normals"][1:], plain["normals"][1:].flip(-1))
    assert torch.equal(out["image"], plain["image"].flip(-1))


def test_eval_transform_is_resize_only() -> None:
    sample = _scene_sample()
    out = EvalTransform((48, 64), TARGET)(sample)
    assert out["image"].shape == (3, 48, 64) and out["image"].dtype == torch.uint8
    assert torch.equal(out["boxes"], sample.boxes) and torch.equal(out["labels"], sample.labels)
    # Zoom 1: depth is the stored value at the sampled pixel.
    assert abs(float(out["depth"][0, 0, 0]) - (1000 + 20 * 4 + 5 * 4) / 1000) < 1e-6
    again = EvalTransform((48, 64), TARGET)(sample)
    assert all(torch.equal(out[k], again[k]) for k in ("image", "depth", "normals", "normals_mask"))


def test_missing_modalities_are_flags_not_values() -> None:
    sample = _scene_sample(depth=False, normals=False)
    sample.scene = -1
    out = TrainTransform(OUT, TARGET)(sample, random.Random(0))
    assert not out["has_depth"] and not out["has_normals"] and not out["has_scene"]
    assert out["scene"] == -1
    assert bool((out["depth"] == 0).all()) and bool((out["normals"] == 0).all())
    assert not bool(out["normals_mask"].any())


def test_fast_hue_matches_torchvision() -> None:
    x = torch.rand(3, 40, 50)
    x[:, :5, :5] = 0.5  # grey pixels
    x[:, 5, 5] = torch.tensor([1.0, 1.0, 0.0])  # ties between channels
    for shift in (-0.05, 0.013, 0.5):
        assert torch.allclose(adjust_hue(x * 255, shift) / 255, TF.adjust_hue(x, shift), atol=1e-5)


def test_color_jitter_is_seeded_and_bounded() -> None:
    image = (torch.rand(3, 30, 40) * 255).to(torch.uint8)
    a = color_jitter(image, random.Random(3))
    b = color_jitter(image, random.Random(3))
    c = color_jitter(image, random.Random(4))
    assert a.dtype == torch.uint8 and torch.equal(a, b) and not torch.equal(a, c)
    # Only saturation active: replay the draws (order, brightness, contrast, saturation) and compare.
    replay = random.Random(5)
    replay.shuffle([0, 1, 2, 3])
    replay.uniform(1, 1), replay.uniform(1, 1)
    factor = replay.uniform(0.75, 1.25)
    out = color_jitter(image, random.Random(5), brightness=0.0, contrast=0.0, saturation=0.25, hue=0.0)
    ref = TF.adjust_saturation(image.float() / 255, factor) * 255
    assert (out.float() - ref).abs().max() <= 0.5 + 1e-3


def test_deferred_jitter_equals_worker_jitter() -> None:
    sample = _scene_sample()
    sample.image = (torch.rand(3, H, W) * 255).to(torch.uint8)  # colourful content, so the jitter matters
    deferred = [TrainTransform(OUT, TARGET)(sample, random.Random(seed)) for seed in range(3)]
    in_worker = [TrainTransform(OUT, TARGET, jitter="cpu")(sample, random.Random(seed)) for seed in range(3)]
    plain = [TrainTransform(OUT, TARGET, jitter="none")(sample, random.Random(seed)) for seed in range(3)]
    for d, w, p in zip(deferred, in_worker, plain):
        assert torch.equal(d["image"], p["image"]) and torch.equal(d["boxes"], w["boxes"])
        assert "color_jitter" not in w and d["color_jitter"].shape == (8,)
        assert not torch.equal(w["image"], p["image"])
        assert (apply_color_jitter(d["image"], d["color_jitter"]).int() - w["image"].int()).abs().max() <= 1
    # Batched on the "device" (here the CPU) by the augmentation step, then normalised by prepare_batch (which
    # refuses a batch whose jitter is still pending): same pixels.
    batch = collate(deferred)
    assert batch["color_jitter"].shape == (3, 8)
    with pytest.raises(ValueError, match="color_jitter"):
        prepare_batch(batch, "cpu")
    augmented = BatchAugment("cpu", OUT, TARGET)(batch)
    assert "color_jitter" not in augmented and augmented["images"].dtype == torch.uint8
    out = prepare_batch(augmented, "cpu")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    pixels = out["images"] * std + mean
    expected = torch.stack([w["image"] for w in in_worker]).float()
    assert (pixels - expected).abs().max() <= 1.01


def test_decode_sample_rejects_missing_and_inconsistent_members() -> None:
    with pytest.raises(DataError, match="rgb.jpg"):
        decode_sample({"__key__": "k", "json": b"{}"}, where="shard-x.tar")
    with pytest.raises(DataError, match="shard-x.tar"):
        decode_sample({"__key__": "k", "json": b"{}", "rgb.jpg": b"not a jpeg"}, where="shard-x.tar")


def test_no_crops_keeps_the_whole_view_and_still_flips() -> None:
    sample = _scene_sample()
    H, W = sample.image.shape[-2:]
    flips = set()
    for seed in range(12):
        out = TrainTransform(OUT, TARGET, no_crops=True, jitter="none")(sample, random.Random(seed))
        g: Geometry = out["geometry"]
        assert (g.x0, g.y0, g.x1, g.y1) == (0, 0, W, H) and g.zoom == pytest.approx(1.0)
        assert len(out["labels"]) == len(sample.labels)  # no box is ever cropped away
        flips.add(g.flip)
    assert flips == {True, False}
    with pytest.raises(ValueError, match="contradict"):
        TrainTransform(OUT, TARGET, force_crops=True, no_crops=True)
