"""Training throughput: the trainer's own step on an in-memory batch, and end to end from shards, per recipe.

Called by `rock_dist.bench` (sections `step` and `e2e`) and by `perf.autotune`. The step timed is the trainer's
(`engine.step.train_step`, on parts set up per each recipe by `engine.step.recipe_step_parts`, one process): move
the CPU batch to the device and normalise it there (`data.batch.prepare_batch`), forward under Accelerate's autocast,
the criterion (it computes in fp32), the global-batch loss normalisation, backward, optimizer step, and the one
host synchronisation of the trainer's non-finite check.

End to end, the two loaders differ as the two recipes do:
- rock_dist: the trainer's loader, `data.pipeline.make_train_loader` on the shards (decoding, augmentation,
  collation in worker processes, pinned batches on CUDA, 4 batches prefetched per worker), feeding the step as the
  training loop does;
- reference-style: the data benchmark's re-implementation of the reference pipeline (`perf.data_bench`: one pickle
  per image, PIL transforms, per-sample CPU prior matching) in a DataLoader with the reference's 2 workers; the
  criterion then takes the loader's matching (`prematched`) instead of matching again.
"""

from __future__ import annotations

import functools
import itertools
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from rock_dist.engine.fast_path import Recipe
from rock_dist.engine.memory import free_device_memory
from rock_dist.engine.step import StepParts, recipe_step_parts, train_step
from rock_dist.model.boxes import MatchResult
from rock_dist.model.losses import Matcher
from rock_dist.perf.memory import peak_memory_mib, reset_peak_memory, rss_mib
from rock_dist.perf.timing import Timing, measure, measure_interleaved, relative_spread, synchronize

Batch = Mapping[str, Any]


# --------------------------------------------------------------------------------------------------------- batches
def shard_batch(train_dir: str, batch_size: int, model_config: Any, *, seed: int = 0) -> dict[str, Any]:
    """The first training batch of our pipeline on `train_dir` (real decoded + augmented samples in the format the
    trainer's step takes, including whatever per-batch keys the pipeline adds), augmented on the CPU so that it
    stays a host batch to pin and time the step on (the augmentation's own cost is in the e2e section)."""
    from rock_dist.data.device_augment import Placement
    from rock_dist.data.loader_spec import TrainLoaderSpec
    from rock_dist.data.pipeline import make_train_loader
    from rock_dist.model.priors import feature_map_sizes

    target = feature_map_sizes(tuple(model_config.image_size), model_config.backbone)[0]
    stream = make_train_loader(TrainLoaderSpec(train_dir, image_size=tuple(model_config.image_size),
                                               target_size=target, batch_size=batch_size, num_workers=0, seed=seed,
                                               augment_on=Placement("workers", torch.device("cpu"))))
    return dict(next(iter(stream)))


def pin(batch: Batch) -> dict[str, Any]:
    """Page-locked copy of a CPU batch (what the pipeline's DataLoader hands out on CUDA machines)."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------------------ step
def build_parts(model_config: Any, loss_config: Any, recipe: Recipe, device: torch.device, *, seed: int = 0,
                matcher: Matcher | None = None) -> StepParts:
    """Fresh trainer step parts with `recipe` applied (same seed for every recipe: same weights)."""
    torch.manual_seed(seed)
    return recipe_step_parts(model_config, loss_config, recipe, device, matcher=matcher)


def step_runner(parts: StepParts) -> Callable[[Batch], dict[str, float]]:
    """One call = one optimizer step of the trainer's `train_step` on one CPU batch, iterations counted as the
    training loop counts them."""
    iterations = itertools.count(1)
    return lambda batch: train_step(parts, [batch], step=next(iterations))


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
        step = step_runner(build_parts(model_config, loss_config, recipe, device, seed=seed))
        batch = batch_source(recipe.batch_size)
        if device.type == "cuda" and recipe.loader == "rock_dist":
            batch = pin(batch)
        for _ in range(max(1, warmup)):
            step(batch)
        synchronize(device)
        steps.append(functools.partial(step, batch))  # this recipe's step and batch, bound now
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
def prematched(gt_boxes: torch.Tensor, gt_labels: torch.Tensor, priors: torch.Tensor, **kwargs: Any) -> MatchResult:
    """The prior matcher for the reference-style loader's batches, whose "labels" B x P and "boxes" B x P x 4 (xyxy)
    already are each prior's match (the reference matches in its loader): they are returned as the match."""
    return MatchResult(gt_labels, gt_boxes, torch.zeros_like(gt_labels, dtype=torch.float32))


class _ReferenceDataset(torch.utils.data.Dataset):
    """The reference-style per-sample pipeline of `perf.data_bench` over its pickles, with the matched boxes
    decoded back to xyxy in the worker: "labels" and "boxes" per prior, for the `prematched` matcher."""

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
        return {"images": s["img"], "labels": s["labels"], "boxes": decode_boxes(s["bboxes"].t(), self.pipe.priors),
                "scene": torch.tensor(int(s["scene_id"])), "depth": s["depth"], "normals": s["normals"],
                "normals_mask": s["normals_mask"]}


def _reference_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Default collation plus the presence flags of docs/data_format.md (every modality present)."""
    batch = torch.utils.data.default_collate(samples)
    ones = torch.ones(batch["images"].shape[0], dtype=torch.bool)
    batch.update(has_scene=ones, has_depth=ones, has_normals=ones)
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
    target = feature_map_sizes(image_size, model_config.backbone)[0]
    dataset = _ReferenceDataset(pickles, image_size, target, model_config.backbone, seed, length)
    kwargs: dict[str, Any] = {"persistent_workers": True, "prefetch_factor": 2} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                       collate_fn=_reference_collate, drop_last=True, **kwargs)


def bench_e2e(recipes: Sequence[Recipe], model_config: Any, loss_config: Any, device: torch.device, *,
              train_dir: str, warmup: int, repeats: int, iters: int, seed: int = 0,
              log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """End-to-end training img/s from shards: each recipe's loader feeding the trainer's step.

    Warm-up steps (worker start-up, first decodes, compilation) are excluded; then `repeats` windows of `iters`
    steps, the device synchronised at each window's ends, median reported. The loader keeps running across
    windows, so a loader slower than the step shows up as lower throughput.
    """
    rows = []
    for recipe in recipes:
        log(f"e2e: {recipe.name} ({recipe.describe()}, {recipe.loader} loader)")
        reset_peak_memory(device)
        with tempfile.TemporaryDirectory(prefix="rock_bench_ref_") as tmp:
            rows.append(_e2e_row(recipe, model_config, loss_config, device, train_dir=train_dir, work_dir=Path(tmp),
                                 seed=seed, warmup=warmup, repeats=repeats, iters=iters))
        free_device_memory(device)  # the row's model, optimizer and loader went with its frame
    synchronize(device)
    return rows


def _e2e_row(recipe: Recipe, model_config: Any, loss_config: Any, device: torch.device, *, train_dir: str,
             work_dir: Path, seed: int, warmup: int, repeats: int, iters: int) -> dict[str, Any]:
    from rock_dist.data.device_augment import resolve_augment_on
    from rock_dist.data.loader_spec import TrainLoaderSpec
    from rock_dist.data.pipeline import make_train_loader
    from rock_dist.model.priors import feature_map_sizes

    reference = recipe.loader == "reference"
    step = step_runner(build_parts(model_config, loss_config, recipe, device, seed=seed,
                                   matcher=prematched if reference else None))
    if reference:
        loader: Any = reference_loader(train_dir, work_dir, model_config, batch_size=recipe.batch_size,
                                       num_workers=max(0, recipe.num_workers), seed=seed)
        workers = max(0, recipe.num_workers)
        augment_on = "workers"  # the reference's own per-sample pipeline
    else:
        target = feature_map_sizes(tuple(model_config.image_size), model_config.backbone)[0]
        # The trainer's default --augment_on auto, on this section's device.
        loader = make_train_loader(TrainLoaderSpec(train_dir, image_size=tuple(model_config.image_size),
                                                   target_size=target, batch_size=recipe.batch_size,
                                                   num_workers=recipe.num_workers, seed=seed,
                                                   augment_on=resolve_augment_on("auto", device)))
        workers, augment_on = loader.num_workers, loader.augment.where
    batches = iter(loader)
    timing = measure(lambda: step(next(batches)), device, warmup=warmup, repeats=repeats, iters=iters)
    row = _row_common(recipe, device, timing, recipe.batch_size)
    row.update(loader=recipe.loader, loader_workers=workers, augment_on=augment_on)
    return row


__all__ = ["shard_batch", "pin", "build_parts", "step_runner", "bench_step", "prematched", "reference_loader",
           "bench_e2e"]
