"""Rank-aggregated evaluation: COCO box AP over the whole split plus the auxiliary-task metrics.

Called by `rock_dist.evaluate` (the command) and by the trainer for periodic and best-on-val evaluation. Every rank
runs the model on its own share of the split (the eval loader gives each image to exactly one rank, possibly
unequal counts), turns each image into a small CPU record (detections in the stored image's pixels, its ground
truth, its auxiliary statistics), and then:

1. all records are gathered (one `all_gather_object`, no other collective, so unequal batch counts cannot hang);
2. the main process de-duplicates them by image id, builds the COCO ground truth and detections in image-id order,
   runs COCOeval ONCE and aggregates the auxiliary statistics, writes the JSON files;
3. the result (or the error) is broadcast, so every rank returns the same metrics or raises the same error.

Because everything after step 1 depends only on the set of records, 1 process and N processes give identical
metrics (docs/evaluation.md), provided the network's outputs per image are the same.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from rock_dist.engine.checkpoint import unwrap_detector
from rock_dist.engine.coco import STAT_NAMES, build_detections, build_ground_truth, format_percent, run_coco_eval
from rock_dist.engine.distributed import broadcast_object, gather_objects, is_distributed, rank
from rock_dist.engine.metrics import aggregate_aux_stats, aux_image_stats, aux_metric_names, format_aux_metric
from rock_dist.errors import DataError, RockError
from rock_dist.fsutil import atomic_write_json

GROUND_TRUTH_FILE = "ground_truth.json"
DETECTIONS_FILE = "detections.json"
METRICS_FILE = "metrics.json"


# ------------------------------------------------------------------------------------------------ per-image records
def _pixel_boxes(boxes: torch.Tensor, height: int, width: int) -> np.ndarray:
    """K x 4 normalised xyxy (any device) -> K x 4 float64 pixel xyxy in an image of `height` x `width`."""
    scale = np.array([width, height, width, height], dtype=np.float64)
    return boxes.detach().float().cpu().numpy().astype(np.float64).reshape(-1, 4) * scale


def batch_records(batch: Mapping[str, torch.Tensor], detections: Sequence[Mapping[str, torch.Tensor]],
                  aux: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One CPU record per image of a batch: id, stored size, ground truth and detections in stored-image pixels.

    batch: `image_id` B, `orig_size` B x 2 (height, width), `boxes` B x M x 4 normalised xyxy, `labels` B x M
    (0 = padding). detections: the model's `postprocess` output (normalised xyxy). aux: `aux_image_stats` output.
    Ground-truth boxes come back as the shards' pixel coordinates: the pipeline stores x / W (float32) of the
    stored image, so x_norm * W is the shard value up to ~1e-4 px of float32 noise, which rounding to 1e-3 px
    removes (integer shard coordinates come back exact, so COCO w = x1 - x0 and area are exact too).
    """
    ids = batch["image_id"].reshape(-1).tolist()
    sizes = batch["orig_size"].reshape(-1, 2).tolist()
    gt_boxes = batch["boxes"].detach().cpu()
    gt_labels = batch["labels"].detach().cpu()
    records: list[dict[str, Any]] = []
    for i, (image_id, (height, width)) in enumerate(zip(ids, sizes)):
        keep = gt_labels[i] > 0
        gt = np.round(_pixel_boxes(gt_boxes[i][keep], height, width), 3)
        det = detections[i]
        record: dict[str, Any] = {
            "image_id": int(image_id), "height": int(height), "width": int(width),
            "gt_boxes": gt, "gt_labels": gt_labels[i][keep].numpy().astype(np.int64),
            "det_boxes": _pixel_boxes(det["boxes"], height, width),
            "det_scores": det["scores"].detach().float().cpu().numpy().astype(np.float64),
            "det_labels": det["labels"].detach().cpu().numpy().astype(np.int64),
        }
        if aux is not None:
            record.update(aux[i])
        records.append(record)
    return records


def deduplicate(records: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], int]:
    """Keep the first record of each image id (rank order, then loader order); return them in id order and the
    number of duplicates dropped. A correct loader gives none; a padded/duplicating one must not count twice."""
    unique: dict[int, Mapping[str, Any]] = {}
    duplicates = 0
    for record in records:
        image_id = int(record["image_id"])
        if image_id in unique:
            duplicates += 1
            continue
        unique[image_id] = record
    return [unique[k] for k in sorted(unique)], duplicates


def compute_metrics(records: Sequence[Mapping[str, Any]], class_names: Sequence[str], *,
                    backend: str = "pycocotools", show_all_cats: bool = False,
                    out_dir: str | Path | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """COCO and auxiliary metrics of unique per-image records (one process; see `evaluate`).

    `extra` entries are added to the metrics. Writes `ground_truth.json`, `detections.json` and `metrics.json`
    to `out_dir` when given (atomically).
    """
    records = sorted(records, key=lambda r: int(r["image_id"]))
    ground_truth = build_ground_truth(records, class_names)
    detections = build_detections(records)
    coco = run_coco_eval(ground_truth, detections, backend=backend)
    metrics: dict[str, Any] = {name: value for name, value in zip(STAT_NAMES, coco.stats)}
    metrics["stats"] = list(coco.stats)
    metrics.update(aggregate_aux_stats(records))
    metrics["num_images"] = len(records)
    metrics["num_gt"] = len(ground_truth["annotations"])
    metrics["num_detections"] = len(detections)
    metrics["num_images_without_gt"] = sum(1 for r in records if len(r["gt_labels"]) == 0)
    metrics["backend"] = backend
    if show_all_cats:
        metrics["per_category"] = coco.per_category
    metrics.update(extra or {})
    metrics["coco_summary"] = coco.summary
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_json(out_dir / GROUND_TRUTH_FILE, ground_truth)
        atomic_write_json(out_dir / DETECTIONS_FILE, detections)
        atomic_write_json(out_dir / METRICS_FILE, {k: v for k, v in metrics.items() if k != "coco_summary"})
    return metrics


# ------------------------------------------------------------------------------------------------------ evaluate
def _autocast(accelerator: Any) -> contextlib.AbstractContextManager[Any]:
    if accelerator is not None and hasattr(accelerator, "autocast"):
        return accelerator.autocast()
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[Mapping[str, torch.Tensor]], accelerator: Any, *,
             loss_config: Any, out_dir: str | Path | None = None, show_all_cats: bool = False,
             class_names: Sequence[str], backend: str = "pycocotools",
             progress: Callable[[int], None] | None = None,
             expected_images: int | None = None) -> dict[str, Any]:
    """Evaluate `model` on every image of `loader` across all ranks; every rank returns the same metrics.

    model: ROCKDetector, possibly wrapped (DDP, torch.compile). loader: this rank's eval batches (format of
    docs/data_format.md; each image on exactly one rank). accelerator: the Accelerator (device, autocast) or None for
    a plain single process on the model's device. loss_config: gives `score_threshold`, `nms_iou`, `max_detections`
    for decoding.
    out_dir: where the main process writes ground_truth.json, detections.json, metrics.json (None: no files).
    show_all_cats: include per-category AP/AP50 (`per_category`). backend: 'pycocotools' or 'faster_coco_eval'.
    progress: called after each batch with the number of images this rank just evaluated.
    expected_images: when given (e.g. the manifest's count), a different number of unique images is a DataError.

    Returns {"AP", "AP50", ... the 12 named COCO stats, "stats": [12], aux metrics (see metrics.py),
    "num_images", "num_gt", "num_detections", "num_images_without_gt", "num_duplicates", "num_processes",
    "images_per_process", "backend", "coco_summary", "seconds", ["per_category"]}. The model's train/eval mode
    is restored afterwards.
    """
    from rock_dist.data.batch import prepare_batch

    start = time.perf_counter()
    # Forward runs on the plain detector, never through DDP (its forward may broadcast buffers, a collective that
    # ranks with unequal batch counts would wait on forever) nor through the trainer's torch.compile wrapper
    # (`accelerator.unwrap_model(..., keep_torch_compile=True)` re-points that live wrapper at the bare module,
    # silently dropping DDP's gradient all-reduce from every later training step).
    forward = plain = unwrap_detector(model)
    device = accelerator.device if accelerator is not None else next(plain.parameters()).device
    tasks = tuple(getattr(plain, "tasks", ()))
    was_training = plain.training
    plain.eval()

    records: list[dict[str, Any]] = []
    caught: Exception | None = None
    try:
        for raw in loader:
            batch = prepare_batch(raw, device)
            with _autocast(accelerator):
                outputs = forward(batch["images"])
            detections = plain.postprocess(outputs, score_threshold=loss_config.score_threshold,
                                           nms_iou=loss_config.nms_iou, max_detections=loss_config.max_detections)
            records.extend(batch_records(batch, detections, aux_image_stats(outputs, batch, tasks)))
            if progress is not None:
                progress(int(batch["image_id"].shape[0]))
    except Exception as err:  # re-raised below, after the other ranks know about it
        if not is_distributed():
            raise
        # Raising here would leave the other ranks waiting in the gather forever: carry the failure through it.
        caught = err
    finally:
        plain.train(was_training)

    failure = None if caught is None else {"message": f"rank {rank()}: {type(caught).__name__}: {caught}",
                                           "rock": isinstance(caught, RockError)}
    gathered = gather_objects({"records": records if caught is None else [], "failure": failure})
    failures = [g["failure"] for g in gathered if g["failure"] is not None]
    if caught is not None:
        raise caught
    if failures:
        error_cls = DataError if failures[0]["rock"] else RuntimeError
        raise error_cls(f"evaluation failed on another process ({failures[0]['message']})")

    result: dict[str, Any] | None = None
    if rank() == 0:
        try:
            unique, duplicates = deduplicate(r for g in gathered for r in g["records"])
            if expected_images is not None and len(unique) != expected_images:
                raise DataError(f"evaluation saw {len(unique)} distinct images but the split has "
                                f"{expected_images}: the loader dropped or invented samples")
            # num_processes / images_per_process show that the work really was split (and how evenly): a
            # launcher that starts N unrelated single processes would report 1 here (docs/training.md).
            extra = {"num_duplicates": duplicates, "num_processes": len(gathered),
                     "images_per_process": [len(g["records"]) for g in gathered]}
            metrics = compute_metrics(unique, class_names, backend=backend, show_all_cats=show_all_cats,
                                      out_dir=out_dir, extra=extra)
            metrics["seconds"] = time.perf_counter() - start
            result = {"metrics": metrics}
        except Exception as err:  # broadcast so that the other ranks do not hang
            if not is_distributed():
                raise
            result = {"error": f"{type(err).__name__}: {err}", "rock": isinstance(err, RockError),
                      "exception": err}
    shared = broadcast_object({k: v for k, v in result.items() if k != "exception"} if result is not None else None)
    if "error" in shared:
        if result is not None and "exception" in result:
            raise result["exception"]
        error_cls = DataError if shared["rock"] else RuntimeError
        raise error_cls(f"evaluation failed on the main process ({shared['error']})")
    return shared["metrics"]


# ------------------------------------------------------------------------------------------------------ printing
def metrics_renderables(metrics: Mapping[str, Any], class_names: Sequence[str] | None = None) -> list[Any]:
    """Rich tables for a metrics dict: the 12 COCO stats, the auxiliary metrics, per-category AP if present."""
    from rich.table import Table

    coco = Table(title=f"COCO box metrics ({metrics.get('num_images', '?')} images, "
                       f"{metrics.get('num_gt', '?')} boxes, {metrics.get('num_detections', '?')} detections)")
    coco.add_column("metric")
    coco.add_column("IoU")
    coco.add_column("area")
    coco.add_column("max dets", justify="right")
    coco.add_column("value (%)", justify="right")
    rows = [("AP", ".50:.95", "all", 100), ("AP", ".50", "all", 100), ("AP", ".75", "all", 100),
            ("AP", ".50:.95", "small", 100), ("AP", ".50:.95", "medium", 100), ("AP", ".50:.95", "large", 100),
            ("AR", ".50:.95", "all", 1), ("AR", ".50:.95", "all", 10), ("AR", ".50:.95", "all", 100),
            ("AR", ".50:.95", "small", 100), ("AR", ".50:.95", "medium", 100), ("AR", ".50:.95", "large", 100)]
    for (kind, iou, area, dets), value in zip(rows, metrics["stats"]):
        coco.add_row(kind, iou, area, str(dets), format_percent(value))
    out: list[Any] = [coco]

    metric_names = aux_metric_names()
    aux_keys = [k for k in metric_names if k in metrics and metrics[k] is not None]
    if aux_keys:
        aux = Table(title="Auxiliary tasks")
        aux.add_column("metric")
        aux.add_column("value", justify="right")
        for key in aux_keys:
            aux.add_row(metric_names[key], format_aux_metric(key, float(metrics[key])))
        out.append(aux)

    per_category = metrics.get("per_category")
    if per_category:
        cats = Table(title="Per-category AP")
        cats.add_column("id", justify="right")
        cats.add_column("class")
        cats.add_column("AP (%)", justify="right")
        cats.add_column("AP50 (%)", justify="right")
        cats.add_column("GT boxes", justify="right")
        cats.add_column("detections", justify="right")
        names = list(class_names) if class_names is not None else list(per_category)
        for i, name in enumerate(names):
            entry = per_category.get(name)
            if entry is None:
                continue
            cats.add_row(str(i + 1), name, format_percent(entry["AP"]), format_percent(entry["AP50"]),
                         str(entry["num_gt"]), str(entry["num_det"]))
        out.append(cats)
    return out


__all__ = ["GROUND_TRUTH_FILE", "DETECTIONS_FILE", "METRICS_FILE", "batch_records", "deduplicate",
           "compute_metrics", "evaluate", "metrics_renderables"]
