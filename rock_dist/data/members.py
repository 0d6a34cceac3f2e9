"""Decoding of one stored member of a shard sample (PNG or .npy) into a C x H x W tensor, and the size check.

Called by the auxiliary tasks' `decode` (rock_dist.tasks: each task reads its own members, docs/architecture.md
"Auxiliary tasks") and by `rock_dist.data.transforms.decode_sample` for the image; inside the loader workers. Kept
apart from the transforms so that the tasks can use it without importing the pipeline.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Mapping

import torch
from torchvision.io import ImageReadMode, decode_png

from rock_dist.data.npy_member import read_npy
from rock_dist.errors import DataError
from rock_dist.tasks.catalog import map_member


def bytes_tensor(data: bytes) -> torch.Tensor:
    """A member's bytes as a uint8 1-D tensor."""
    # frombuffer needs a writable buffer to avoid a warning; bytearray costs one memcpy, far below decode time.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@contextlib.contextmanager
def quiet_torchvision_io() -> Iterator[None]:
    """torchvision 0.29 marks torchvision.io's decoders deprecated in favour of TorchCodec (not part of our pinned
    stack); they work and are the fastest decoders here, but warn on every call. Scoped, so that test runners (which
    reset warning filters) stay quiet too."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        yield


# PNG read mode and description per element layout of a catalog member (dtype name, channels; rock_dist.tasks.catalog).
_PNG_MODE: dict[tuple[str, int], tuple[ImageReadMode, str]] = {
    ("uint16", 1): (ImageReadMode.UNCHANGED, "16-bit single-channel"),
    ("uint8", 3): (ImageReadMode.RGB, "8-bit RGB"),
    ("uint8", 1): (ImageReadMode.GRAY, "8-bit single-channel"),
}


def aux_member(raw: Mapping[str, Any], name: str, loc: str, *, kind: str | None = None) -> torch.Tensor | None:
    """The C x H x W tensor of auxiliary member `name` (a dense member of rock_dist.tasks.catalog) stored as .png or
    .npy (the shard builder's --aux_format); None when the sample has neither. DataError on the wrong dtype or
    channels; `kind` describes the expected layout in that message (default: from the layout)."""
    layout = map_member(name)
    type_name, channels = layout.dtype, layout.channels
    dtype = getattr(torch, type_name)
    mode, described = _PNG_MODE[(type_name, channels)]
    if f"{name}.npy" in raw:
        if f"{name}.png" in raw:
            raise DataError(f"{loc}: both {name}.png and {name}.npy; a sample holds one of them")
        tensor = torch.from_numpy(read_npy(bytes(raw[f"{name}.npy"])))
        member = f"{name}.npy"
    elif f"{name}.png" in raw:
        with quiet_torchvision_io():
            tensor = decode_png(bytes_tensor(raw[f"{name}.png"]), mode=mode)
        member = f"{name}.png"
    else:
        return None
    if tensor.dtype != dtype or tensor.ndim != 3 or tensor.shape[0] != channels:
        raise DataError(f"{loc}: {member} must be {kind or described}, got {tensor.dtype} of shape "
                        f"{tuple(tensor.shape)}")
    return tensor


def check_size(loc: str, name: str, tensor: torch.Tensor | None, size: tuple[int, int]) -> None:
    """DataError when the C x H x W member `name` is not of the image's `size` (H, W); None passes."""
    H, W = size
    if tensor is not None and tuple(tensor.shape[1:]) != (H, W):
        raise DataError(f"{loc}: {name} is {tensor.shape[1]}x{tensor.shape[2]}, image is {H}x{W}")


__all__ = ["bytes_tensor", "quiet_torchvision_io", "aux_member", "check_size"]
