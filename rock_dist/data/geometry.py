"""The spatial part of one training augmentation (`Geometry`): a pixel crop of the stored image, then a flip.

Its own module so that the task modules (`rock_dist.tasks`), which sample their target maps through it, do not
import the transforms that loop over them. Drawn by `data.transforms`, applied there and by `data.device_augment`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

Size = tuple[int, int]


@dataclass(frozen=True)
class Geometry:
    """The spatial part of one augmentation: pixel crop [x0, x1) x [y0, y1) of the stored image, then flip."""

    x0: int
    y0: int
    x1: int
    y1: int
    flip: bool
    image_size: Size  # stored (H, W)

    def as_row(self) -> tuple[int, int, int, int, int]:
        """(x0, y0, x1, y1, flip): how a batch carries the geometry from the workers (`augment_geometry`,
        `jpeg_geometry`, int64 B x 5) to the training process's batched steps."""
        return self.x0, self.y0, self.x1, self.y1, int(self.flip)

    @classmethod
    def from_row(cls, row: Sequence[int], image_size: Sequence[int]) -> Geometry:
        """The geometry of one row written by `as_row`, for a stored image of `image_size` (H, W)."""
        x0, y0, x1, y1, flip = (int(v) for v in row)
        return cls(x0, y0, x1, y1, bool(flip), (int(image_size[0]), int(image_size[1])))

    @property
    def zoom_xy(self) -> tuple[float, float]:
        """(zx, zy): magnification relative to the uncropped image resized to the same input size."""
        H, W = self.image_size
        return W / (self.x1 - self.x0), H / (self.y1 - self.y0)

    @property
    def zoom(self) -> float:
        """Scalar zoom for depth: geometric mean of zx and zy (docs/augmentation.md: depth is divided by it)."""
        zx, zy = self.zoom_xy
        return math.sqrt(zx * zy)


__all__ = ["Geometry"]
