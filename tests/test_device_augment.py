"""`--augment_on device` (rock_dist.data.device_augment): the batched augmentation step against the per-sample path
of the loader workers (rock_dist.data.transforms), on the CPU.

- exactness: with the same draws (same seed, or one given geometry) the device step gives the workers' boxes,
  labels, depth, normals and mask exactly and the RGB within 1 grey level, on batches of mixed stored sizes;
- statistics: over thousands of draws with DIFFERENT seeds the two paths' output distributions agree (flip
  fraction, crop zoom and aspect, boxes kept per image, pixel mean/std);
- the training stream and the trainer honour the flag.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import make_cfg

from rock_dist.data.batch import collate
from rock_dist.data.device_augment import BatchAugment, Placement, resize_taps, resolve_augment_on
from rock_dist.data.loader_spec import TrainLoaderSpec
from rock_dist.data.pipeline import make_train_loader
from rock_dist.data.transforms import (DecodedSample, Geometry, TrainTransform, crop_flip_resize, deferred_sample,
                                       sample_aux_maps)
from rock_dist.errors import ConfigError

OUT = (24, 32)
TARGET = (6, 8)


def _sample(H: int, W: int, seed: int, *, depth: bool = True, normals: bool = True, boxes: int = 3,
            noise: bool = True) -> DecodedSample:
    """A synthetic decoded sample: noisy or smooth pixels, boxes in the left half (so a flip shows in the boxes'
    mean centre), depth and normals maps (16-bit depth up to 65535 mm exercises the unsigned gather)."""
    g = torch.Generator().manual_seed(seed)
    if noise:
        image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)
    else:  # a left-to-right ramp: a flip changes the left/right halves' means
        ramp = torch.linspace(20, 230, W)[None, None].expand(3, H, W)
        image = (ramp + torch.tensor([0.0, 10.0, -10.0])[:, None, None]).round().to(torch.uint8)
    xy = torch.rand(boxes, 2, generator=g) * torch.tensor([0.3, 0.6])
    wh = torch.rand(boxes, 2, generator=g) * 0.3 + 0.05
    box = torch.cat([xy, xy + wh], 1)
    labels = torch.randint(1, 6, (boxes,), generator=g)
    d = torch.randint(0, 65536, (1, H, W), dtype=torch.int32, generator=g).to(torch.uint16) if depth else None
    n = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g) if normals else None
    m = (torch.rand(1, H, W, generator=g) > 0.3).to(torch.uint8) if normals else None
    return DecodedSample(key=f"s{seed}", image_id=seed, image=image, boxes=box, labels=labels, depth_mm=d,
                         normals=n, normals_mask=m, scene=seed % 4)


def _assert_matches_workers(workers: dict[str, Any], device: dict[str, Any], rgb_tolerance: int = 1) -> None:
    """Every key equal, RGB within `rgb_tolerance` grey levels; the device batch's box padding may be longer (boxes
    dropped by the crop stay as padding) and must then be zeros / label 0."""
    assert sorted(workers) == sorted(device)
    m = workers["labels"].shape[1]
    assert not device["labels"][:, m:].any() and not device["boxes"][:, m:].any()
    for key, value in workers.items():
        other = device[key][:, :m] if key in ("boxes", "labels") else device[key]
        if key == "images":
            diff = (value.int() - other.int()).abs()
            # Both resize with torch's antialiased bilinear weights, the workers in uint8 fixed point and the device
            # step in float32, each rounding once: they differ by rounding only.
            assert int(diff.max()) <= rgb_tolerance and float(diff.float().mean()) < 0.5, key
        else:
            assert torch.equal(value, other), key


# ------------------------------------------------------------------------------------------------ exactness
def test_same_draws_give_the_workers_batch_on_mixed_sizes() -> None:
    """Same seeds: same crops and flips; stored sizes differ inside the batch (zero-padded to the largest), samples
    without depth or normals mixed in, and crops that downscale as well as ones that magnify."""
    sizes = [(60, 80), (40, 50), (72, 64), (24, 32), (30, 90)]
    samples = [_sample(*sizes[i % len(sizes)], i, depth=i % 3 != 0, normals=i % 4 != 1) for i in range(20)]
    for out, jitter in ((OUT, "none"), ((64, 96), "none"), (OUT, "device")):
        workers = TrainTransform(out, TARGET, jitter=jitter)  # type: ignore[arg-type]
        device = TrainTransform(out, TARGET, jitter=jitter, defer_augment=True)  # type: ignore[arg-type]
        wb = collate([workers(s, random.Random(i)) for i, s in enumerate(samples)])
        db = collate([device(s, random.Random(i)) for i, s in enumerate(samples)])
        assert db["raw_image"].shape == (20, 3, 72, 90)  # padded to the largest height and width
        assert db["raw_depth"].dtype == torch.uint16 and "images" not in db and "depth" not in db
        step = BatchAugment("cpu", out, TARGET)
        # The jitter's factors (brightness, contrast, saturation up to 1.15, 1.25, 1.5 per grey level of input
        # difference) can amplify the resize's 1-level rounding difference to a few levels.
        _assert_matches_workers(step(wb), step(db), rgb_tolerance=1 if jitter == "none" else 4)


def test_fixed_geometry_matches_the_per_sample_functions() -> None:
    """Given geometries (no randomness): crops larger and smaller than the output, flipped or not, the whole
    image, against `crop_flip_resize` and `sample_aux_maps`."""
    s = _sample(60, 80, 0)
    geoms = [Geometry(0, 0, 80, 60, False, (60, 80)), Geometry(5, 7, 45, 37, True, (60, 80)),
             Geometry(10, 3, 30, 18, False, (60, 80)), Geometry(0, 10, 79, 59, True, (60, 80)),
             Geometry(33, 20, 34, 21, True, (60, 80))]
    keep = torch.ones(3, dtype=torch.bool)
    batch = collate([deferred_sample(s, g, keep, None) for g in geoms])
    out = BatchAugment("cpu", OUT, TARGET)(batch)
    for i, g in enumerate(geoms):
        image = crop_flip_resize(s.image, g, OUT)
        assert int((image.int() - out["images"][i].int()).abs().max()) <= 1
        aux = sample_aux_maps(s, g, TARGET)
        for key in ("depth", "normals", "normals_mask"):
            assert torch.equal(aux[key], out[key][i]), key


def test_resize_taps_are_torchs_antialiased_bilinear() -> None:
    """The taps reproduce F.interpolate(antialias=True) on float data, up- and downscaling (float rounding)."""
    x = torch.rand(1, 1, 1, 50, dtype=torch.float64)
    for n in (7, 50, 133):
        ref = torch.nn.functional.interpolate(x, size=(1, n), mode="bilinear", antialias=True, align_corners=False)
        idx, w = resize_taps(torch.tensor([0]), torch.tensor([50]), n)
        mine = (x[0, 0, 0][idx[0]] * w[0].double()).sum(-1)
        assert torch.allclose(mine, ref[0, 0, 0], atol=1e-6), n


# ------------------------------------------------------------------------------------------------ statistics
def _outputs(device: bool, seeds: range) -> dict[str, torch.Tensor]:
    """Per-image statistics of the augmented outputs of one sample under `seeds`."""
    s = _sample(48, 64, 0, noise=False, boxes=3)
    s.depth_mm = torch.full((1, 48, 64), 2000, dtype=torch.uint16)  # output depth = 2 m / zoom
    s.normals = torch.full((3, 48, 64), round(127.5 * (1 + 0.5)), dtype=torch.uint8)  # n = (.5, .5, .5) / |.|
    s.normals_mask = torch.ones(1, 48, 64, dtype=torch.uint8)
    transform = TrainTransform(OUT, TARGET, defer_augment=device, jitter="none")
    step = BatchAugment("cpu", OUT, TARGET)
    parts = []
    for chunk in range(seeds.start, seeds.stop, 500):
        batch = collate([transform(s, random.Random(k)) for k in range(chunk, min(chunk + 500, seeds.stop))])
        out = step(batch)
        kept = out["labels"] > 0
        cx = ((out["boxes"][..., 0] + out["boxes"][..., 2]) / 2 * kept).sum(1) / kept.sum(1)
        images = out["images"].float()
        n = out["normals"][:, :, 0, 0]
        parts.append({"boxes": kept.sum(1).float(), "box_cx": cx, "zoom": 2.0 / out["depth"][:, 0, 0, 0],
                      "aspect": n[:, 1].abs() / n[:, 0].abs(), "flipped": (n[:, 0] < 0).float(),
                      "pixel_mean": images.mean((1, 2, 3)), "pixel_std": images.std((1, 2, 3)),
                      "left_minus_right": images[..., :16].mean((1, 2, 3)) - images[..., 16:].mean((1, 2, 3))})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov D: the largest gap between the empirical CDFs."""
    grid = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, grid, right=True).double() / len(a)
    cdf_b = torch.searchsorted(b.sort().values, grid, right=True).double() / len(b)
    return float((cdf_a - cdf_b).abs().max())


def test_device_path_has_the_workers_distributions() -> None:
    """Independent draws (different seeds) for the two paths, N = 2000 each. Tolerances from the sample sizes:
    means (and proportions) agree within 4.5 standard errors of their difference, sqrt(var_a / N + var_b / N)
    (a false alarm has probability ~7e-6 per comparison); whole distributions (crop zoom, aspect, boxes kept) by
    the two-sample KS statistic D <= 1.95 sqrt(2 / N), its 0.1 % critical value."""
    n = 2000
    workers, device = _outputs(False, range(n)), _outputs(True, range(n, 2 * n))
    for key in workers:
        a, b = workers[key], device[key]
        standard_error = math.sqrt(float(a.var()) / n + float(b.var()) / n)
        assert abs(float(a.mean()) - float(b.mean())) <= 4.5 * standard_error + 1e-6, key
    for key in ("zoom", "aspect", "boxes", "pixel_mean"):
        assert _ks_statistic(workers[key], device[key]) <= 1.95 * math.sqrt(2 / n), key
    # The statistics measure what they claim: about half flipped, crops zoom in, some boxes dropped.
    assert 0.45 < float(device["flipped"].mean()) < 0.55
    assert float((device["zoom"] > 1.01).float().mean()) > 0.5
    assert float(device["boxes"].min()) >= 1 and float(device["boxes"].mean()) < 3


# ------------------------------------------------------------------------------------------------ flag and stream
def test_resolve_augment_on() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_augment_on("auto", cpu) == Placement("workers", cpu)
    assert resolve_augment_on("auto", cuda) == Placement("device", cuda)
    assert resolve_augment_on("auto", cuda, color_jitter="cpu").where == "workers"
    assert resolve_augment_on("auto", cuda, decode_device="cuda").where == "workers"
    assert resolve_augment_on("device", cpu) == Placement("device", cpu)
    assert resolve_augment_on("workers", cuda) == Placement("workers", cuda)
    with pytest.raises(ConfigError, match="--color_jitter device"):
        resolve_augment_on("device", cpu, color_jitter="cpu")
    with pytest.raises(ConfigError, match="--decode_device cuda"):
        resolve_augment_on("device", cpu, decode_device="cuda")


def test_training_stream_on_device_gives_the_workers_batches(shard_dir: Path) -> None:
    def stream(where: str, jitter: str) -> Any:
        return make_train_loader(TrainLoaderSpec(str(shard_dir / "train"), image_size=(64, 80), target_size=(8, 10),
                                                 batch_size=3, num_workers=0, seed=5,
                                                 color_jitter=jitter,  # type: ignore[arg-type]
                                                 augment_on=Placement(where, torch.device("cpu"))))  # type: ignore

    raw = next(stream("device", "device").worker_batches())  # the workers ship decoded samples and parameters
    assert {"raw_image", "augment_geometry", "box_keep", "color_jitter"} <= set(raw) and "images" not in raw
    for jitter, tolerance in (("none", 1), ("device", 4)):
        workers, device = iter(stream("workers", jitter)), iter(stream("device", jitter))
        for _ in range(3):
            _assert_matches_workers(dict(next(workers)), dict(next(device)), tolerance)


def test_trainer_runs_with_augment_on_device(shard_dir: Path, tmp_path: Path) -> None:
    from rock_dist.engine.trainer import Trainer

    trainer = Trainer(make_cfg(shard_dir, tmp_path, "--augment_on", "device", "--num_iters", "2"))
    result = trainer.fit()
    assert trainer._stream.augment == Placement("device", torch.device("cpu"))
    assert trainer._stream._transform.defer_augment
    assert result.step == 2
