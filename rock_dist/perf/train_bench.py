"""Training throughput: one optimizer step on an in-memory batch, and end to end from shards, per recipe.

Called by `rock_dist.bench` (sections `step` and `e2e`) and by `perf.memory.find_max_train_batch_size`. The step is
the trainer's step for one process (`engine.trainer.Trainer.train_step` without its all-reduces): move the CPU batch
to the device and normalise it there (`data.batch.prepare_batch`), forward under the recipe's autocast, the
criterion outside autocast (it computes in fp32), backward, optimizer step, and one host synchronisation to check the
loss is finite (the trainer's per-step non-finite stop costs the same synchronisation).

End to end, the two loaders differ as the two recipes do:
- rock_dist: `data.pipeline.make_train_loader` on the shards (decoding, augmentation, collation in worker
  processes, pinned batches on CUDA, 4 batches prefetched per worker), plus a device prefetcher on CUDA that copies
  the next batch on a side stream while the current step computes;
- reference-style: the data benchmark's re-implementation of the reference pipeline (`perf.data_bench`: one pickle
  per image, PIL transforms, per-sample CPU prior matching) in a DataLoader with the reference's 2 workers; the step
  then uses the loader's matching (`recipes.PrematchedCriterion`) instead of matching again.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from rock_dist.errors import NonFiniteLossError
from rock_dist.perf.memory import free_device_memory, peak_memory_mib, reset_peak_memory, rss_mib
from rock_dist.perf.recipes import Applied, Recipe, apply_recipe
from rock_dist.perf.timing import Timing, measure, measure_interleaved, relative_spread, synchronize

Batch = Mapping[str, Any]


# --------------------------------------------------------------------------------------------------------- batches
def synthetic_batch(batch_size: int, model_config: Any, *, seed: int = 0, max_boxes: int = 6) -> dict[str, Any]:
    """A random CPU batch in the docs/data_format.md format for `model_config` (used where no shards are at hand).

    images uint8 B x 3 x H x W; 1..max_boxes random boxes per image (normalised xyxy); every modality present.
    """
    from rock_dist.model.priors import feature_map_sizes

    g = torch.Generator().manual_seed(seed)
    H, W = model_config.image_size
    h, w = feature_map_sizes(tuple(model_config.image_size), model_config.backbone)[0]
    B, M = batch_size, max_boxes
    xy = torch.rand(B, M, 2, generator=g) * 0.7
    wh = 0.05 + torch.rand(B, M, 2, generator=g) * 0.25
    boxes = torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=2)
    counts = torch.randint(1, M + 1, (B,), generator=g)
    present = torch.arange(M)[None, :] < counts[:, None]
    labels = torch.where(present, torch.randint(1, model_config.num_classes, (B, M), generator=g), 0)
    boxes = torch.where(present[:, :, None], boxes, torch.zeros_like(boxes))
    normals = torch.nn.functional.normalize(torch.randn(B, 3, h, w, generator=g), dim=1)
    return {
        "images": torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=g),
        "boxes": boxes, "labels": labels,
        "scene": torch.randint(0, model_config.num_scenes, (B,), generator=g),
        "has_scene": torch.ones(B, dtype=torch.bool), "has_depth": torch.ones(B, dtype=torch.bool),
        "has_normals": torch.ones(B, dtype=torch.bool),
        "depth": 0.5 + 4.0 * torch.rand(B, 1, h, w, generator=g), "normals": normals,
        "normals_mask": torch.ones(B, 1, h, w, dtype=torch.bool),
        "image_id": torch.arange(B, dtype=torch.int64), "orig_size": torch.tensor([[H, W]] * B),
    }


def shard_batch(train_dir: str, batch_size: int, model_config: Any, *, seed: int = 0) -> dict[str, Any]:
    """The first training batch of our pipeline on `train_dir` (real decoded + augmented samples, exactly the
    format the trainer sees, including whatever per-batch keys the pipeline adds)."""
    from rock_dist.data.pipeline import make_train_loader
    from rock_dist.model.priors import feature_map_sizes

    target = feature_map_sizes(tuple(model_config.image_size), model_config.backbone)[0]
    stream = make_train_loader(train_dir, image_size=tuple(model_config.image_size), target_size=tuple(target),
                               batch_size=batch_size, num_workers=0, seed=seed, rank=0, world_size=1)
    return dict(next(iter(stream)))


def pin(batch: Batch) -> dict[str, Any]:
    """Page-locked copy of a CPU batch (what the pipeline's DataLoader hands out on CUDA machines)."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------------------ step
def make_train_step(applied: Applied) -> Callable[[Batch], torch.Tensor]:
    """A function running one full training step of `applied` on a CPU batch; returns the (detached) loss."""
    from rock_dist.data.batch import prepare_batch

    model, criterion, optimizer = applied.model, applied.criterion, applied.optimizer
    assert criterion is not None and optimizer is not None, "make_train_step needs a training recipe (apply_recipe)"
    device, channels_last, autocast = applied.device, applied.recipe.channels_last, applied.autocast

    def step(batch: Batch) -> torch.Tensor:
        prepared = batch if batch.get("__on_device__") else prepare_batch(batch, device, channels_last=channels_last)
        with autocast():
            outputs = model(prepared["images"])
        loss = criterion(outputs, prepared)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not bool(torch.isfinite(loss)):  # the trainer's per-step synchronisation
            raise NonFiniteLossError("non-finite loss in the training benchmark (random weights diverged?)")
        return loss.detach()

    return step


def build_applied(model_config: Any, loss_config: Any, recipe: Recipe, device: torch.device, *, seed: int = 0,
                  prematched: bool = False) -> Applied:
    """A fresh model + criterion + optimizer with `recipe` applied (same seed for every recipe: same weights)."""
    from rock_dist.model.builder import build_criterion, build_model

    torch.manual_seed(seed)
    cfg = dataclasses.replace(model_config, pretrained="none")
    return apply_recipe(build_model(cfg), build_criterion(cfg, loss_config), recipe, device, prematched=prematched)


def _row_common(recipe: Recipe, device: torch.device, timing: Timing, images_per_iter: int) -> dict[str, Any]:
    return {"recipe": recipe.name, "describe": recipe.describe(), "config": recipe.to_dict(),
            "batch_size": images_per_iter, "img_per_s": timing.rate(images_per_iter), "timing": timing.to_dict(),
            "peak_gpu_mib": peak_memory_mib(device), "rss_mib": rss_mib()}


def bench_step(recipes: Sequence[Recipe], model_config: Any, loss_config: Any, device: torch.device, *,
               batch_source: Callable[[int], Batch], warmup: int, repeats: int, iters: int, seed: int = 0,
               max_rounds: int = 0, target_spread: float = 0.05,
               log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Training-step img/s of each recipe on an in-memory CPU batch (transfer + normalisation included).

    All recipes are built first and timed in interleaved rounds (`timing.measure_interleaved`): at least
    `repeats` rounds, more (up to `max_rounds`, default 4x `repeats`) until every recipe's speed-up over the first
    is stable to `target_spread`; each row reports its per-round speed-ups and their spread, so rows can be ranked
    on a noisy machine. Peak GPU memory is then that of all recipes together, so it is measured per recipe during
    its warm-up instead."""
    steps: list[Callable[[], Any]] = []
    peaks: list[float | None] = []
    for recipe in recipes:
        log(f"step: {recipe.name} ({recipe.describe()})")
        reset_peak_memory(device)
        applied = build_applied(model_config, loss_config, recipe, device, seed=seed)
        batch = batch_source(recipe.batch_size)
        if device.type == "cuda" and recipe.loader == "rock_dist":
            batch = pin(batch)
        step = make_train_step(applied)
        for _ in range(max(1, warmup)):
            step(batch)
        synchronize(device)
        steps.append(lambda step=step, batch=batch: step(batch))
        peaks.append(peak_memory_mib(device))
    timings, ratios = measure_interleaved(steps, device, warmup=0, min_rounds=max(1, repeats),
                                          max_rounds=max_rounds or 4 * max(1, repeats), iters=iters,
                                          target_spread=target_spread)
    rows = []
    for recipe, timing, ratio, peak in zip(recipes, timings, ratios, peaks):
        timing.warmup = max(1, warmup)
        row = _row_common(recipe, device, timing, recipe.batch_size)
        row["peak_gpu_mib"] = peak
        # The speed-up as the median of per-round ratios: robust to load that changes between rounds.
        row["speedup_rounds"] = ratio
        row["speedup_spread"] = relative_spread(ratio)
        rows.append(row)
    del steps  # the closures hold the models and batches
    free_device_memory(device)
    return rows


# ----------------------------------------------------------------------------------------------------- end to end
class DevicePrefetcher:
    """Iterates CPU batches as device batches, copying batch i+1 on a side CUDA stream while batch i is used.

    Needs pinned source batches for the copy to be asynchronous (the pipeline pins on CUDA). On a CPU it simply
    prepares each batch when asked. Yields prepared batches (`prepare_batch` output, marked `__on_device__`).
    """

    def __init__(self, batches: Iterator[Batch], device: torch.device, channels_last: bool) -> None:
        self.batches = batches
        self.device = device
        self.channels_last = channels_last
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._next: dict[str, Any] | None = None
        self._preload()

    def _prepare(self, batch: Batch) -> dict[str, Any]:
        from rock_dist.data.batch import prepare_batch

        out = prepare_batch(batch, self.device, channels_last=self.channels_last, non_blocking=True)
        out["__on_device__"] = True
        return out

    def _preload(self) -> None:
        try:
            batch = next(self.batches)
        except StopIteration:
            self._next = None
            return
        if self.stream is None:
            self._next = dict(batch)  # prepared lazily, in __next__
            return
        with torch.cuda.stream(self.stream):
            self._next = self._prepare(batch)

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._next is None:
            raise StopIteration
        batch = self._next
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for value in batch.values():
                if isinstance(value, torch.Tensor):
                    value.record_stream(current)  # the side stream must not reuse this memory too early
        else:
            batch = self._prepare(batch)
        self._preload()
        return batch


class _ReferenceDataset(torch.utils.data.Dataset):
    """The reference-style per-sample pipeline of `perf.data_bench` over its pickles, with the matched boxes
    decoded back to xyxy in the worker (so the step's criterion can take them as they are)."""

    def __init__(self, pickles: list[Path], image_size: tuple[int, int], target: tuple[int, int], backbone: str,
                 seed: int, length: int) -> None:
        from rock_dist.perf.data_bench import _ReferenceStyle

        self.pickles, self.seed, self.length = pickles, seed, length
        self.pipe = _ReferenceStyle(image_size, target, backbone)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        from rock_dist.model.boxes import decode_boxes

        s = self.pipe(self.pickles[index % len(self.pickles)], random.Random(self.seed * 1_000_003 + index))
        return {"images": s["img"], "match_labels": s["labels"],
                "match_boxes": decode_boxes(s["bboxes"].t(), self.pipe.priors),
                "scene": torch.tensor(int(s["scene_id"])), "depth": s["depth"], "normals": s["normals"],
                "normals_mask": s["normals_mask"]}


def _reference_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collation plus the keys of docs/data_format.md the criterion reads (every modality present)."""
    batch = torch.utils.data.default_collate(samples)
    B = batch["images"].shape[0]
    ones = torch.ones(B, dtype=torch.bool)
    batch.update(has_scene=ones, has_depth=ones, has_normals=ones, boxes=torch.zeros(B, 1, 4),
                 labels=torch.zeros(B, 1, dtype=torch.int64))
    return batch


def reference_loader(train_dir: str, work_dir: Path, model_config: Any, *, batch_size: int, num_workers: int,
                     seed: int, max_pickles: int = 256, length: int = 1_000_000) -> torch.utils.data.DataLoader:
    """A DataLoader of the reference-style pipeline on up to `max_pickles` images of `train_dir` (pickled into
    `work_dir`, not timed). Shuffled, default collation, like the reference."""
    from rock_dist.data.sources import iter_shard, load_sources
    from rock_dist.model.priors import feature_map_sizes
    from rock_dist.perf.data_bench import _write_reference_pickles

    raws: list[dict[str, Any]] = []
    for shard in (sh for src in load_sources(train_dir) for sh in src.shards):
        raws.extend(iter_shard(shard))
        if len(raws) >= max_pickles:
            break
    pickles = _write_reference_pickles(raws[:max_pickles], work_dir)
    image_size = tuple(model_config.image_size)
    target = tuple(feature_map_sizes(image_size, model_config.backbone)[0])
    dataset = _ReferenceDataset(pickles, image_size, target, model_config.backbone, seed, length)
    kwargs: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": 2} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                       collate_fn=_reference_collate, drop_last=True, **kwargs)


def bench_e2e(recipes: Sequence[Recipe], model_config: Any, loss_config: Any, device: torch.device, *,
              train_dir: str, warmup: int, repeats: int, iters: int, seed: int = 0,
              log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """End-to-end training img/s from shards: each recipe's loader feeding its training step.

    Warm-up steps (worker start-up, first decodes, compilation) are excluded; then `repeats` windows of `iters`
    steps, the device synchronised at each window's ends, median reported. The loader keeps running across
    windows, so a loader slower than the step shows up as lower throughput.
    """
    from rock_dist.data.pipeline import make_train_loader
    from rock_dist.model.priors import feature_map_sizes

    rows = []
    target = tuple(feature_map_sizes(tuple(model_config.image_size), model_config.backbone)[0])
    for recipe in recipes:
        log(f"e2e: {recipe.name} ({recipe.describe()}, {recipe.loader} loader)")
        reset_peak_memory(device)
        with tempfile.TemporaryDirectory(prefix="rock_bench_ref_") as tmp:
            prematched = recipe.loader == "reference"
            applied = build_applied(model_config, loss_config, recipe, device, seed=seed, prematched=prematched)
            if prematched:
                loader: Any = reference_loader(train_dir, Path(tmp), model_config, batch_size=recipe.batch_size,
                                               num_workers=max(0, recipe.num_workers), seed=seed)
                workers = max(0, recipe.num_workers)
                batches: Iterator[Batch] = iter(loader)
            else:
                loader = make_train_loader(train_dir, image_size=tuple(model_config.image_size), target_size=target,
                                           batch_size=recipe.batch_size, num_workers=recipe.num_workers, seed=seed,
                                           rank=0, world_size=1)
                workers = loader.num_workers
                batches = DevicePrefetcher(iter(loader), device, recipe.channels_last)
            step = make_train_step(applied)
            timing = measure(lambda: step(next(batches)), device, warmup=warmup, repeats=repeats, iters=iters)
            row = _row_common(recipe, device, timing, recipe.batch_size)
            row.update(loader=recipe.loader, loader_workers=workers)
            rows.append(row)
            del batches, loader, applied, step
            free_device_memory(device)
    synchronize(device)
    return rows


__all__ = ["synthetic_batch", "shard_batch", "pin", "make_train_step", "build_applied", "bench_step",
           "DevicePrefetcher", "reference_loader", "bench_e2e"]
