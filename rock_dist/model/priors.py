"""Feature-map geometry and SSD prior (default) boxes for any input size.

Called by the data pipeline (`feature_map_sizes(...)[0]` is the size of the auxiliary targets), by the detector and
the criterion (`make_priors`), and by the SSD head (`extra_layer_kernels` picks the kernels of the last two extra
layers). Everything here is pure Python arithmetic on sizes: no network is built.

Generalisation of the reference (which hard-codes 480x640) to an input of H x W pixels:

* Feature maps. The dilated ResNet has output stride 16, each of its four stride-2 stages (7x7 conv, max-pool,
  layer2, layer3) maps a side n to ceil(n / 2). Extra layers 1-3 are 3x3 stride-2 convolutions with padding 1
  (again ceil(n / 2)). Extra layer 4 is a 3x3 convolution without padding (n - 2); where a side is already below 3
  its kernel shrinks to that side, so the output side is 1. Extra layer 5 has a kernel as large as its input map,
  so the last map is always 1x1 (the reference's (2, 3) kernel at 480x640). At 480x640 this gives the reference's
  30x40, 15x20, 8x10, 4x5, 2x3, 1x1.
* Steps. A map of side f on an input side S has step floor(S / f) pixels, and prior centres are at
  (j + 0.5) * step / S. At 480x640 this reproduces the reference's steps_h = [16, 32, 60, 120, 240, 480] and
  steps_w = [16, 32, 64, 128, 213, 640] exactly (including 213 = floor(640 / 3)).
* Scales. The scales s_k = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05] and the aspect ratios are fractions of the
  input's height and width and do not change with the input size (as in the reference, a "square" prior is square
  in normalised coordinates, not in pixels).
"""

from __future__ import annotations

import math

import torch

from rock_dist.config import BACKBONES
from rock_dist.errors import ConfigError

# Prior definition (reference `pboxes_rock`), docs/architecture.md.
PRIOR_SCALES: tuple[float, ...] = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)
ASPECT_RATIOS: tuple[tuple[int, ...], ...] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
# Priors per location: two square sizes plus a transposed pair per aspect ratio (4, 6, 6, 6, 4, 4).
PRIORS_PER_LOCATION: tuple[int, ...] = tuple(2 + 2 * len(a) for a in ASPECT_RATIOS)
NUM_FEATURE_MAPS = len(ASPECT_RATIOS)

# Box-coding variances (docs/architecture.md), shared by encoding (criterion) and decoding (postprocess).
VARIANCE_XY = 0.1
VARIANCE_WH = 0.2

Size = tuple[int, int]


def _half(n: int) -> int:
    """Output side of a stride-2 convolution or pooling with 'same'-style padding: ceil(n / 2)."""
    return (n + 1) // 2


def backbone_feature_size(image_size: Size, backbone: str = "resnet50") -> Size:
    """Side of the backbone's output map (stride 16, last stage dilated) for an input of `image_size` (H, W)."""
    if backbone not in BACKBONES:
        raise ConfigError(f"--backbone {backbone!r}: unknown backbone; choose one of {', '.join(BACKBONES)}")
    h, w = (int(s) for s in image_size)
    if h < 1 or w < 1:
        raise ConfigError(f"--image_size {h} {w}: both sides must be positive")
    # conv1 (7x7/2, pad 3), max-pool (3x3/2, pad 1), layer2 and layer3 each halve with rounding up; layer4 is dilated.
    for _ in range(4):
        h, w = _half(h), _half(w)
    return h, w


def extra_layer_kernels(image_size: Size, backbone: str = "resnet50") -> tuple[Size, Size]:
    """Kernels (kh, kw) of the 4th and 5th SSD extra layers (both unpadded) for this input size.

    The 4th is 3x3 unless a side of its input is smaller; the 5th covers its whole input so the last map is 1x1.
    """
    h, w = backbone_feature_size(image_size, backbone)
    for _ in range(3):
        h, w = _half(h), _half(w)
    k4 = (min(3, h), min(3, w))
    h4, w4 = h - k4[0] + 1, w - k4[1] + 1
    return k4, (h4, w4)


def feature_map_sizes(image_size: Size, backbone: str = "resnet50") -> list[Size]:
    """The 6 detection feature-map sizes [(h, w), ...] for an input of `image_size` (H, W); pure Python.

    The first entry is the backbone / ROCK map, i.e. the size of the auxiliary (depth, normals) targets.
    At (480, 640): [(30, 40), (15, 20), (8, 10), (4, 5), (2, 3), (1, 1)].
    """
    sizes = [backbone_feature_size(image_size, backbone)]
    for _ in range(3):
        h, w = sizes[-1]
        sizes.append((_half(h), _half(w)))
    k4, k5 = extra_layer_kernels(image_size, backbone)
    h, w = sizes[-1]
    sizes.append((h - k4[0] + 1, w - k4[1] + 1))
    h, w = sizes[-1]
    sizes.append((h - k5[0] + 1, w - k5[1] + 1))
    return sizes


def feature_map_steps(image_size: Size, backbone: str = "resnet50") -> list[Size]:
    """Per-map steps (step_h, step_w) in pixels: floor(input side / map side) (see the module docstring)."""
    H, W = (int(s) for s in image_size)
    return [(H // h, W // w) for h, w in feature_map_sizes(image_size, backbone)]


def num_priors(image_size: Size, backbone: str = "resnet50") -> int:
    """Number of priors P for this input size (7228 at 480x640)."""
    return sum(a * h * w for a, (h, w) in zip(PRIORS_PER_LOCATION, feature_map_sizes(image_size, backbone)))


def prior_sizes(k: int) -> list[tuple[float, float]]:
    """Normalised (w, h) of the priors of map k, in the order they are laid out (sizes before positions)."""
    s, s_next = PRIOR_SCALES[k], PRIOR_SCALES[k + 1]
    s_mid = math.sqrt(s * s_next)
    sizes = [(s, s), (s_mid, s_mid)]
    for a in ASPECT_RATIOS[k]:
        r = math.sqrt(a)
        sizes += [(s * r, s / r), (s / r, s * r)]
    return sizes


def make_priors(image_size: Size, backbone: str = "resnet50", *, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Prior boxes P x 4 as normalised (cx, cy, w, h), clamped to [0, 1].

    Order: feature map, then prior size (see `prior_sizes`), then row, then column — the same order in which the
    SSD head flattens its predictions. Computed in float64 and cast, so values do not depend on the device.
    """
    H, W = (int(s) for s in image_size)
    chunks = []
    for k, ((fh, fw), (step_h, step_w)) in enumerate(zip(feature_map_sizes(image_size, backbone),
                                                         feature_map_steps(image_size, backbone))):
        cy = (torch.arange(fh, dtype=torch.float64) + 0.5) * step_h / H
        cx = (torch.arange(fw, dtype=torch.float64) + 0.5) * step_w / W
        grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")  # row-major: row, then column
        centres = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)  # (fh*fw) x 2
        for w, h in prior_sizes(k):
            wh = torch.tensor([w, h], dtype=torch.float64).expand(centres.shape[0], 2)
            chunks.append(torch.cat([centres, wh], dim=1))
    priors = torch.cat(chunks, dim=0).clamp_(0.0, 1.0)
    return priors.to(device=device, dtype=dtype)


__all__ = [
    "PRIOR_SCALES", "ASPECT_RATIOS", "PRIORS_PER_LOCATION", "NUM_FEATURE_MAPS", "VARIANCE_XY", "VARIANCE_WH",
    "backbone_feature_size", "extra_layer_kernels", "feature_map_sizes", "feature_map_steps", "num_priors",
    "prior_sizes", "make_priors",
]
