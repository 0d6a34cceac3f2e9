"""The batch format of docs/data_format.md: collation of transformed samples and the move to the training device.

`collate` runs inside the loader workers (batching is part of the pipeline, so workers ship whole batches and the
main process does no per-sample work); `prepare_batch` is called by the trainer, evaluation and benchmarks on every
batch to move it to the device and normalise the images there (uint8 crosses the host-device link: 4x fewer bytes
than float32, and the normalisation runs on the accelerator).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import get_worker_info

from rock_dist.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from rock_dist.tasks import registry


def _empty_like_batch(first: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """An uninitialised tensor of `first`'s dtype, in shared memory when running in a DataLoader worker.

    A worker's batch is moved to shared memory when it is sent to the main process; writing it into shared memory
    in the first place (as torch's default_collate does) saves that second copy of the largest tensors.
    """
    if get_worker_info() is None:
        return first.new_empty(tuple(shape))
    numel = 1
    for n in shape:
        numel *= int(n)
    storage = first.untyped_storage()._new_shared(numel * first.element_size(), device=first.device)
    return first.new(storage).resize_(*shape)


def _stack_shared(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.stack, writing straight into shared memory in a DataLoader worker (`_empty_like_batch`)."""
    if get_worker_info() is None:
        return torch.stack(list(tensors))
    return torch.stack(list(tensors), out=_empty_like_batch(tensors[0], (len(tensors), *tensors[0].shape)))


def _pad_stack(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """C x H_i x W_i tensors (None: absent, all zeros) stacked into B x C x max H x max W, zero-padded at the bottom
    and right; None when every entry is None. Images of different sizes share one batch this way (the device
    augmentation reads each one's own size from `orig_size`)."""
    present = [t for t in tensors if t is not None]
    if not present:
        return None
    first = present[0]
    H = max(int(t.shape[1]) for t in present)
    W = max(int(t.shape[2]) for t in present)
    if len(present) == len(tensors) and all(tuple(t.shape[1:]) == (H, W) for t in present):
        return _stack_shared(present)
    out = _empty_like_batch(first, (len(tensors), first.shape[0], H, W)).zero_()
    for i, t in enumerate(tensors):
        if t is not None:
            out[i, :, :t.shape[1], :t.shape[2]] = t
    return out


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack per-sample dicts (from `TrainTransform` / `EvalTransform`) into one batch dict (docs/data_format.md).

    Boxes are padded to M = max(1, most boxes in the batch) with label 0; M >= 1 keeps every shape non-empty so
    that matching code needs no special case for a batch without objects.
    The auxiliary tasks' keys come from the registry (rock_dist.tasks): each label task's `target_keys` (as its
    `label_dtype`), every task's presence flag (bool B), each map task's `target_keys` stacked (or, deferred, its
    `raw_keys` padded).
    Shapes: images uint8 B x 3 x H x W, boxes float32 B x M x 4, labels int64 B x M, scene int64 B, has_* bool B,
    depth float32 B x 1 x h x w, normals float32 B x 3 x h x w, normals_mask bool B x 1 x h x w, image_id int64 B,
    orig_size int64 B x 2; plus color_jitter float32 B x 8 when the transform deferred the colour jitter to the
    device (see `rock_dist.data.transforms`), consumed by `prepare_batch`. With deferred decoding the images are
    not there yet: `jpeg` (a list of B uint8 tensors) and `jpeg_geometry` (int64 B x 5) stand in their place until
    `rock_dist.data.device_decode` turns them into `images`.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    B = len(samples)
    M = max(1, max(int(s["labels"].shape[0]) for s in samples))
    boxes = torch.zeros(B, M, 4, dtype=torch.float32)
    labels = torch.zeros(B, M, dtype=torch.int64)
    for i, s in enumerate(samples):
        n = int(s["labels"].shape[0])
        if n:
            boxes[i, :n] = s["boxes"]
            labels[i, :n] = s["labels"]
    deferred = any("jpeg_geometry" in s for s in samples)
    tasks = [task for task in registry.all_tasks() if task.target_kind is not None]
    out: dict[str, Any] = {"boxes": boxes, "labels": labels}  # tensors, and the list of JPEG tensors (deferred)
    # The tasks' per-image values (labels, then presence flags: the key order of `transforms.task_values`).
    for task in tasks:
        if task.target_kind == "label":
            out.update((key, torch.tensor([s[key] for s in samples], dtype=task.label_dtype))
                       for key in task.target_keys)
    for task in tasks:
        out[task.presence_key] = torch.tensor([bool(s[task.presence_key]) for s in samples], dtype=torch.bool)
    out.update(image_id=torch.tensor([int(s["image_id"]) for s in samples], dtype=torch.int64),
               orig_size=torch.tensor([list(s["orig_size"]) for s in samples], dtype=torch.int64))
    maps = [task for task in tasks if task.target_kind == "map"]
    if "augment_geometry" in samples[0]:
        # Augmentation deferred to the training device (rock_dist.data.device_augment): the decoded sample, padded,
        # with its crop / flip and the crop's kept-box mask.
        keep = torch.zeros(B, M, dtype=torch.bool)
        for i, s in enumerate(samples):
            keep[i, :int(s["box_keep"].shape[0])] = s["box_keep"]
        out.update(augment_geometry=torch.stack([s["augment_geometry"] for s in samples]), box_keep=keep)
        for key in ("raw_image", *(key for task in maps for key in task.raw_keys.values())):
            padded = _pad_stack([s[key] for s in samples])
            if padded is not None:
                out[key] = padded
    else:
        for key in (key for task in maps for key in task.target_keys):
            out[key] = torch.stack([s[key] for s in samples])
    if deferred:
        # Decoding deferred to the main process (rock_dist.data.device_decode): each entry is a JPEG's bytes (1-D)
        # with its crop and flip, or an image the worker finished (a PNG sample, 3-D; its geometry row unused).
        out["jpeg"] = [s["image"] for s in samples]
        out["jpeg_geometry"] = torch.stack([s.get("jpeg_geometry", torch.zeros(5, dtype=torch.int64))
                                            for s in samples])
    elif "image" in samples[0]:
        out["images"] = _stack_shared([s["image"] for s in samples])
    if "color_jitter" in samples[0]:
        out["color_jitter"] = torch.stack([s["color_jitter"] for s in samples])
    return out


_NORM_CACHE: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean/std scaled to uint8 pixel units (1 x 3 x 1 x 1), cached per device to avoid re-uploads."""
    key = (str(device), dtype)
    if key not in _NORM_CACHE:
        mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).mul(255.0).view(1, 3, 1, 1).to(device)
        inv_std = torch.tensor(IMAGENET_STD, dtype=dtype).mul(255.0).reciprocal().view(1, 3, 1, 1).to(device)
        _NORM_CACHE[key] = (mean, inv_std)
    return _NORM_CACHE[key]


def prepare_batch(batch: Mapping[str, Any], device: torch.device | str, *, channels_last: bool = False,
                  non_blocking: bool = True) -> dict[str, Any]:
    """Move a batch to `device` and turn `images` (uint8 B x 3 x H x W) into float32 normalised with ImageNet
    mean/std, on the device. Non-tensor values are passed through; the input dict is not modified.

    Only moves and normalises: a training batch is augmented first (`rock_dist.data.device_augment`, which the
    training stream applies), so a batch that still carries augmentation work (colour jitter parameters or
    undecoded-geometry keys) is a ValueError rather than silently trained on unaugmented. Float images are taken as
    already normalised. `non_blocking` only overlaps the copy when the batch is in pinned memory (the loaders pin on
    CUDA machines).
    """
    pending = sorted(k for k in _PENDING if k in batch)
    if pending:
        raise ValueError(f"prepare_batch got a batch with augmentation still to do ({', '.join(pending)}); apply "
                         "rock_dist.data.device_augment.BatchAugment first (the training stream does)")
    device = torch.device(device)
    out: dict[str, Any] = {key: value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor)
                           else value for key, value in batch.items()}
    images = out.get("images")
    if images is not None:
        if images.dtype == torch.uint8:
            mean, inv_std = _mean_std(device, torch.float32)
            images = images.to(torch.float32).sub_(mean).mul_(inv_std)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        out["images"] = images
    return out


# Keys only a batch that has not been through the augmentation step carries.
_PENDING = ("color_jitter", "augment_geometry", "jpeg")


__all__ = ["collate", "prepare_batch"]
