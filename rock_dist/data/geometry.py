"""The spatial part of one training augmentation (`Geometry`): a pixel crop of the stored image, then a flip.

Its own module so that the task modules (`rock_dist.tasks`), which sample their target maps through it, do not
import the transforms that loop over them. Drawn by `data.transforms`, applied there and by `data.device_augment`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
