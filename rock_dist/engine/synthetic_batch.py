"""A random training batch in the docs/data_format.md format, for work that needs a batch but no shards.

Called by the batch-size probe (`engine.memory.find_max_train_batch_size`), the autotune (`perf.autotune`) and the
tests.
"""

from __future__ import annotations

from typing import Any

import torch

from rock_dist.tasks import registry


def synthetic_batch(batch_size: int, model_config: Any, *, seed: int = 0, max_boxes: int = 6) -> dict[str, Any]:
    """A random CPU batch in the docs/data_format.md format for `model_config` (used where no shards are at hand).

    images uint8 B x 3 x H x W; 1..max_boxes random boxes per image (normalised xyxy); every task's target present
    (`AuxTask.synthetic_targets`).
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
    out: dict[str, Any] = {
        "images": torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=g),
        "boxes": boxes, "labels": labels,
    }
    # The auxiliary tasks' targets (rock_dist.tasks), drawn in registry order from the same generator, every sample
    # with its targets.
    tasks = [task for task in registry.all_tasks() if task.target_kind is not None]
    targets = [task.synthetic_targets(B, (h, w), model_config, g) for task in tasks]
    for task, values in zip(tasks, targets):
        if task.target_kind == "label":
            out.update(values)
    out.update((task.presence_key, torch.ones(B, dtype=torch.bool)) for task in tasks)
    for task, values in zip(tasks, targets):
        if task.target_kind == "map":
            out.update(values)
    out.update(image_id=torch.arange(B, dtype=torch.int64), orig_size=torch.tensor([[H, W]] * B))
    return out


__all__ = ["synthetic_batch"]
