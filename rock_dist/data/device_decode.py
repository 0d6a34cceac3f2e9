"""Optional GPU JPEG decoding (`--decode_device cuda`): the training JPEGs decoded batched with nvJPEG in the main
process, instead of one by one in the loader workers.

Called by `rock_dist.data.pipeline.TrainStream`, which maps `DeviceDecoder` over its batches. With deferred decoding
the workers read the JPEG header only (`transforms.decode_sample(..., defer_jpeg=True)`), draw the same crop, flip
and jitter as always, build the auxiliary targets, and ship the JPEG's bytes with the crop and flip
(`rock_dist.data.batch.collate`: keys `jpeg`, `jpeg_geometry`); `DeviceDecoder` decodes a whole batch with one
`torchvision.io.decode_jpeg(list, device=...)` call and applies the crop, flip and resize there with the workers' own
`transforms.crop_flip_resize`. The rest of the pipeline (colour jitter in `rock_dist.data.device_augment`,
normalisation in `prepare_batch`) is unchanged. `--augment_on device` does not combine with it (the decoder already
does the image geometry on the GPU; the configuration refuses the pair).

Fallbacks, each announced by one warning line: no CUDA device at start → the workers decode on the CPU as usual;
a batch the GPU cannot decode but the CPU can → this batch and every later one decoded on the CPU in the main
process (the workers keep shipping bytes). A JPEG neither can decode is a DataError, as in the workers.
docs/data_pipeline.md says when this helps (loader-bound training with few CPU cores per GPU).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Mapping

import torch

from rock_dist.data.members import quiet_torchvision_io
from rock_dist.data.transforms import Geometry, crop_flip_resize, decode_rgb
from rock_dist.errors import DataError

Size = tuple[int, int]
DecodeDevice = Literal["cpu", "cuda"]

def resolve_decode_device(requested: DecodeDevice) -> torch.device | None:
    """The device deferred decoding runs on, or None for the workers' CPU decoding (with a warning when CUDA was
    asked for but is absent). "cuda" means the current CUDA device (Accelerate sets it per local rank)."""
    if requested == "cpu":
        return None
    if not torch.cuda.is_available():
        warnings.warn("--decode_device cuda: no CUDA device here; the loader workers decode the JPEGs on the CPU",
                      stacklevel=3)
        return None
    return torch.device("cuda", torch.cuda.current_device())


def finish_images(batch: Mapping[str, Any], device: torch.device | str, image_size: Size) -> dict[str, Any]:
    """`batch` with `jpeg` / `jpeg_geometry` replaced by `images` (uint8 B x 3 x H x W on `device`): the JPEGs
    decoded in one call on `device`, then cropped, flipped and resized per their geometry."""
    device = torch.device(device)
    items = batch["jpeg"]
    pending = [t for t in items if t.dim() == 1]
    decoded = iter(_decode_many(pending, device) if pending else [])
    images = []
    for item, row in zip(items, batch["jpeg_geometry"].tolist()):  # geometry: host data
        if item.dim() == 1:
            image = next(decoded)
            geom = Geometry.from_row(row, image.shape[1:])
            images.append(crop_flip_resize(image, geom, image_size))
        else:
            images.append(item.to(device, non_blocking=True))
    out = {k: v for k, v in batch.items() if k not in ("jpeg", "jpeg_geometry")}
    out["images"] = torch.stack(images)
    return out


def _decode_many(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if device.type == "cpu":
        return [decode_rgb(d) for d in data]
    from torchvision.io import decode_jpeg

    with quiet_torchvision_io():
        images = decode_jpeg(data, device=device)  # one batched nvJPEG call
    return [im.expand(3, -1, -1).contiguous() if im.shape[0] == 1 else im for im in images]


class DeviceDecoder:
    """Turns batches with deferred JPEGs into ordinary batches (see the module docstring); other batches pass
    through. `device` is where decoding runs now (it becomes the CPU after a GPU failure)."""

    def __init__(self, device: torch.device | str, image_size: Size) -> None:
        self.device = torch.device(device)
        self.image_size = (int(image_size[0]), int(image_size[1]))

    def __call__(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        if "jpeg" not in batch:
            return batch
        if self.device.type != "cpu":
            try:
                return finish_images(batch, self.device, self.image_size)
            except RuntimeError as err:
                gpu_error = err
            out = self._on_cpu(batch)  # a DataError here is the data's fault, not the GPU's
            warnings.warn(f"--decode_device cuda: the GPU could not decode a batch that the CPU could "
                          f"({type(gpu_error).__name__}: {gpu_error}); decoding on the CPU from now on",
                          stacklevel=2)
            self.device = torch.device("cpu")
            return out
        return self._on_cpu(batch)

    def _on_cpu(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        try:
            return finish_images(batch, "cpu", self.image_size)
        except RuntimeError as err:
            raise DataError(f"a training JPEG cannot be decoded ({err}); the shard is corrupt — check it with "
                            "`python -m rock_dist.shards verify`") from err


__all__ = ["DecodeDevice", "resolve_decode_device", "finish_images", "DeviceDecoder"]
