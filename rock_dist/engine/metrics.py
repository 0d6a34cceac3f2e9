"""Auxiliary-task metrics: scene accuracy, depth abs-rel / RMSE / δ<1.25, normals angle statistics (docs/evaluation.md).

Called by `rock_dist.engine.evaluation.evaluate` in two steps so that the numbers do not depend on how images were
split across ranks: `aux_image_stats` turns one batch of predictions into small per-image records (computed on the
batch's device, then moved to the CPU), which are gathered with the detections; `aggregate_aux_stats` combines the
de-duplicated records in image-id order on one process. What each task measures is declared by its module in
rock_dist.tasks (`image_stats`, `aggregate`); this module runs them for the registered tasks.

Definitions (pooled over all valid pixels of the evaluated set, as in Eigen et al.):
- depth: prediction = exp(predicted log depth) at the auxiliary map size; valid pixels have a finite target > 0 in
  images whose depth is present; abs-rel = mean |p - t| / t, RMSE = sqrt(mean (p - t)^2) in metres,
  δ<1.25 = fraction with max(p / t, t / p) < 1.25.
- normals: angle between the normalised prediction and the target over pixels of the validity mask in images with
  normals; mean and median in degrees, fractions below 11.25°, 22.5° and 30°.
- scene: top-1 accuracy over images with a scene label.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from rock_dist.tasks import registry


def aux_metric_names() -> dict[str, str]:
    """Keys of the aggregated dictionary, with a short description (console table, README), in registry order."""
    return {key: text for task in registry.all_tasks() for key, text in task.metric_names.items()}


@torch.no_grad()
def aux_image_stats(outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                    tasks: Sequence[str]) -> list[dict[str, Any]]:
    """Per-image sufficient statistics of the auxiliary predictions of one batch.

    outputs: the model's dict with one prediction per task in `tasks` (e.g. `scene` B x S log-probabilities,
    `depth` B x 1 x h x w log depth, `normals` B x 3 x h x w). batch: the (device) batch with each task's target
    and presence keys (docs/data_format.md). Returns B dicts with one entry per registered task, under its
    `record_key` (`scene_correct` bool; `depth` (sum abs-rel, sum squared error, count δ<1.25, valid pixels);
    `normals_angles` float32 array of angles in degrees; ...), None where the task is not trained or the image has
    no target. Needs `image_id` B in batch.
    """
    batch_size = int(batch["image_id"].shape[0])
    records: list[dict[str, Any]] = [{task.record_key: None for task in registry.all_tasks()}
                                     for _ in range(batch_size)]
    for task in registry.all_tasks():
        if task.name in tasks and task.name in outputs:
            for record, entry in zip(records, task.image_stats(outputs[task.name], batch)):
                record[task.record_key] = entry
    return records


def aggregate_aux_stats(records: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """Combine per-image statistics (already unique per image, in image-id order) into the aux metrics.

    Returns only the metrics of tasks with at least one valid target, plus their counts (`num_scene`,
    `depth_pixels`, `normals_pixels`, ...).
    """
    out: dict[str, float | int] = {}
    for task in registry.all_tasks():
        entries = [r[task.record_key] for r in records if r.get(task.record_key) is not None]
        if entries:
            out.update(task.aggregate(entries))
    return out


def format_aux_metric(key: str, value: float) -> str:
    """Metric `key` as the console's table shows it (the format of the task that reports it)."""
    task = next((t for t in registry.all_tasks() if key in t.metric_names), None)
    return task.format_metric(key, value) if task is not None else f"{100 * value:.1f} %"


__all__ = ["aux_metric_names", "aux_image_stats", "aggregate_aux_stats", "format_aux_metric"]
