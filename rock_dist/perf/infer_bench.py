"""Inference and evaluation throughput per recipe: images/s including decoding and NMS, and evaluation wall time.

Called by `rock_dist.bench` (sections `infer` and `eval`). One inference iteration is what `rock_dist.detect` and
evaluation do per batch: copy a uint8 batch to the device and normalise it there, the forward pass under the
recipe's precision, then `ROCKDetector.postprocess` (softmax, score threshold, per-class top-k, one batched NMS,
top 100 per image), whose per-image split synchronises with the host, so the timing is of finished results.

A randomly initialised detector gives almost no class score above the 0.05 threshold, which would leave NMS with
nothing to do. `nms_load="trained"` therefore sets the confidence heads' class biases to 0 (scores near 1/C), so
every image sends its full per-class top-k to NMS and keeps about 100 detections, like a trained detector on a
cluttered scene (an upper bound on decoding work); `nms_load="init"` keeps the initial weights.

The post-processing settings (score threshold, NMS IoU, detections per image) are those saved with a weights file
when the bench is given one (`--weights`, read by `saved_postprocess`), so the timing is of the decoding that model
is deployed with.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Sequence

import torch

from rock_dist.engine.fast_path import Applied, Recipe, apply_inference_recipe
from rock_dist.engine.memory import free_device_memory
from rock_dist.perf.memory import peak_memory_mib, reset_peak_memory, rss_mib
from rock_dist.perf.timing import measure

NmsLoad = Literal["trained", "init"]


def saved_postprocess(weights: str) -> Any:
    """LossConfig whose post-processing fields are those saved with `weights` (a weights file or checkpoint), the
    defaults when `weights` is empty."""
    from rock_dist.config import resolve_postprocess

    if not weights:
        return resolve_postprocess(None)
    from rock_dist.engine.checkpoint import read_checkpoint
    from rock_dist.engine.weights import stored_postprocess

    return resolve_postprocess(stored_postprocess(read_checkpoint(weights), weights))


def build_inference(model_config: Any, recipe: Recipe, device: torch.device, *, seed: int = 0,
                    nms_load: NmsLoad = "trained") -> Applied:
    """A fresh detector (same seed for every recipe) set up for inference per `recipe`."""
    from rock_dist.model.builder import build_model

    torch.manual_seed(seed)
    model = build_model(dataclasses.replace(model_config, pretrained="none"))
    if nms_load == "trained":
        with torch.no_grad():
            for name, param in model.named_parameters():
                # The conf heads' biases hold -log(99) for the object classes (docs/architecture.md): zero them so that
                # scores pass the threshold and NMS works as it does for a trained model.
                if ".conf" in f".{name}" and name.endswith("bias"):
                    param.zero_()
    return apply_inference_recipe(model, recipe, device)


def make_infer_step(applied: Applied, loss_config: Any) -> Callable[[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """uint8 CPU images B x 3 x H x W → per-image detections (on the device), as `detect` and evaluation run it."""
    from rock_dist.data.batch import prepare_batch

    model, module, device, autocast = applied.model, applied.module, applied.device, applied.autocast
    channels_last = applied.recipe.channels_last

    @torch.inference_mode()
    def infer(images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        prepared = prepare_batch({"images": images}, device, channels_last=channels_last)
        with autocast():
            outputs = model(prepared["images"])
        return module.postprocess(outputs, score_threshold=loss_config.score_threshold, nms_iou=loss_config.nms_iou,
                                  max_detections=loss_config.max_detections)

    return infer


def bench_infer(recipes: Sequence[Recipe], model_config: Any, loss_config: Any, device: torch.device, *,
                batch_sizes: Sequence[int], warmup: int, repeats: int, iters: int, seed: int = 0,
                nms_load: NmsLoad = "trained", log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """img/s of inference + decoding + NMS for each recipe at each batch size (random uint8 images in memory)."""
    rows = []
    for recipe in recipes:
        for bs in batch_sizes:
            log(f"infer: {recipe.name} batch {bs} ({recipe.describe(inference=True, batch_size=bs)})")
            reset_peak_memory(device)
            rows.append(_infer_row(recipe, bs, model_config, loss_config, device, seed=seed, nms_load=nms_load,
                                   warmup=warmup, repeats=repeats, iters=iters))
            free_device_memory(device)  # the row's model and images went with its frame
    return rows


def _infer_row(recipe: Recipe, bs: int, model_config: Any, loss_config: Any, device: torch.device, *, seed: int,
               nms_load: NmsLoad, warmup: int, repeats: int, iters: int) -> dict[str, Any]:
    H, W = model_config.image_size
    infer = make_infer_step(build_inference(model_config, recipe, device, seed=seed, nms_load=nms_load), loss_config)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (bs, 3, H, W), dtype=torch.uint8, generator=g)
    if device.type == "cuda":
        images = images.pin_memory()
    detections = infer(images)
    timing = measure(lambda: infer(images), device, warmup=warmup, repeats=repeats, iters=iters)
    return {"recipe": recipe.name, "describe": recipe.describe(inference=True, batch_size=bs),
            "config": {**recipe.to_dict(), "batch_size": bs},
            "batch_size": bs, "img_per_s": timing.rate(bs), "timing": timing.to_dict(),
            "detections_per_image": sum(int(d["scores"].numel()) for d in detections) / bs,
            "peak_gpu_mib": peak_memory_mib(device), "rss_mib": rss_mib()}


def bench_eval(recipes: Sequence[Recipe], model_config: Any, loss_config: Any, device: torch.device, *,
               test_dir: str, repeats: int, seed: int = 0, nms_load: NmsLoad = "trained",
               log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Wall time of `engine.evaluation.evaluate` over the whole split `test_dir` per recipe (loader, model, NMS,
    gathering, COCOeval, aux metrics), median of `repeats` runs after one untimed warm-up run."""
    import time

    from rock_dist.data.manifest import load_manifest
    from rock_dist.data.loader_spec import EvalLoaderSpec
    from rock_dist.data.pipeline import make_eval_loader
    from rock_dist.engine.evaluation import evaluate
    from rock_dist.model.priors import feature_map_sizes

    manifest = load_manifest(test_dir)
    cfg = dataclasses.replace(model_config, num_classes=len(manifest.class_names) + 1,
                              num_scenes=len(manifest.scene_types))
    target = feature_map_sizes(tuple(cfg.image_size), cfg.backbone)[0]
    rows = []
    for recipe in recipes:
        log(f"eval: {recipe.name} ({recipe.describe(inference=True)})")
        reset_peak_memory(device)
        applied = build_inference(cfg, recipe, device, seed=seed, nms_load=nms_load)
        workers = max(0, recipe.num_workers) if recipe.loader == "reference" else -1
        loader = make_eval_loader(EvalLoaderSpec(test_dir, image_size=tuple(cfg.image_size), target_size=target,
                                                 batch_size=recipe.batch_size, num_workers=workers))
        times, metrics = [], {}
        for i in range(max(1, repeats) + 1):
            start = time.perf_counter()
            with applied.autocast():  # evaluate() without an accelerator adds no autocast of its own
                metrics = evaluate(applied.model, loader, None, loss_config=loss_config,
                                   class_names=manifest.class_names)
            if i > 0:  # the first run starts the loader workers (and compiles): excluded
                times.append(time.perf_counter() - start)
        times.sort()
        median = times[len(times) // 2]
        n = int(metrics.get("num_images", manifest.num_samples))
        rows.append({"recipe": recipe.name, "describe": recipe.describe(inference=True), "config": recipe.to_dict(),
                     "batch_size": recipe.batch_size, "seconds": median, "seconds_all": times, "num_images": n,
                     "img_per_s": n / median if median > 0 else float("nan"), "loader_workers": loader.num_workers,
                     "AP": float(metrics.get("AP", float("nan"))), "peak_gpu_mib": peak_memory_mib(device),
                     "rss_mib": rss_mib()})
        del applied, loader
        free_device_memory(device)
    return rows


__all__ = ["saved_postprocess", "build_inference", "make_infer_step", "bench_infer", "bench_eval"]
