"""Pictures of predictions: drawn detections, colour-mapped depth, RGB-coded normals and a scene label.

Used by `rock_dist.detect` (files written to disk) and by the engine's TensorBoard image logging. Every function
accepts tensors on any device (CPU, CUDA) and returns a CPU `uint8` tensor of shape 3 x H x W, so callers never
have to care where the model ran (the reference's TensorBoard grids assumed CUDA).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours for the detection classes; label l uses _PALETTE[(l - 1) % len]. Chosen by hand to
# stay readable on indoor scenes (no near-greys) and to differ between neighbouring label ids.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128),
)

# Anchor colours of the depth colour map, from near (index 0) to far: bright yellow through orange, magenta and
# violet to a dark blue. Near objects are bright so that the foreground stands out; linear interpolation between
# anchors gives a smooth, monotonically darkening ramp without needing matplotlib.
_DEPTH_ANCHORS = np.array([
    (252, 253, 191), (253, 205, 114), (252, 137, 97), (226, 72, 100), (183, 55, 121),
    (140, 41, 129), (94, 23, 127), (48, 17, 90), (12, 8, 38),
], dtype=np.float32)


def _to_cpu_image(image: torch.Tensor) -> torch.Tensor:
    """3 x H x W image (uint8, or float in [0, 1]) on any device -> contiguous CPU uint8 3 x H x W."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image of shape 3 x H x W, got {tuple(image.shape)}")
    image = image.detach().to("cpu")
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.contiguous()


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _from_pil(picture: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(picture.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow >= 10.1 bundles a scalable default font; older builds without FreeType fall back to the bitmap one.
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - very old Pillow
        return ImageFont.load_default()


def _label_font_size(height: int, width: int) -> int:
    # Readable on both 64x80 test images and 480x640 photos.
    return int(max(9, min(24, round(min(height, width) / 32))))


def class_color(label: int) -> tuple[int, int, int]:
    """Drawing colour of a detection label id (1..C-1)."""
    return _PALETTE[(int(label) - 1) % len(_PALETTE)]


def _text_on_box(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color: tuple[int, int, int],
                 font: ImageFont.ImageFont | ImageFont.FreeTypeFont, image_size: tuple[int, int]) -> None:
    """Write `text` on a filled tag whose bottom-left corner is at `xy`, kept inside the image."""
    width, height = image_size
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 4, bottom - top + 4
    x = min(max(0.0, xy[0]), max(0.0, width - tw))
    y = xy[1] - th
    if y < 0:  # no room above the box: put the tag just inside its top edge
        y = min(max(0.0, xy[1]), max(0.0, height - th))
    draw.rectangle((x, y, x + tw, y + th), fill=color)
    # Dark text on light colours, white on dark ones.
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    draw.text((x + 2 - left, y + 2 - top), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255),
              font=font)


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                    class_names: Sequence[str], *, line_width: int | None = None, min_side: int = 0) -> torch.Tensor:
    """Draw boxes with "class score" tags on a copy of `image`.

    image: 3 x H x W uint8 (or float in [0, 1]); boxes: K x 4 pixel xyxy in that image's coordinates;
    labels: K ints 1..len(class_names) (0 = background is never drawn); scores: K floats. Any device.
    min_side: when the image's shorter side is below it, the picture is enlarged by the smallest whole factor that
    reaches it (boxes scaled alike) — on a 120 x 160 image even the smallest legible tag hides the object it names.
    Returns a CPU uint8 3 x (H*f) x (W*f) tensor (f = 1 unless enlarged); the input is not modified.
    """
    canvas = _to_cpu_image(image)
    boxes = boxes.detach().to("cpu", torch.float32).reshape(-1, 4)
    factor = -(-min_side // min(canvas.shape[1:])) if min_side > min(canvas.shape[1:]) else 1
    if factor > 1:
        canvas = torch.nn.functional.interpolate(canvas[None].float(), scale_factor=factor, mode="bilinear",
                                                 align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        boxes = boxes * factor
    labels = labels.detach().to("cpu").reshape(-1)
    scores = scores.detach().to("cpu", torch.float32).reshape(-1)
    if not (len(boxes) == len(labels) == len(scores)):
        raise ValueError(f"boxes ({len(boxes)}), labels ({len(labels)}) and scores ({len(scores)}) differ in length")
    _, height, width = canvas.shape
    picture = _to_pil(canvas)
    draw = ImageDraw.Draw(picture)
    font = _font(_label_font_size(height, width))
    lw = line_width or max(1, round(min(height, width) / 160))
    # Lowest score first so that the most confident boxes and tags end up on top.
    for i in torch.argsort(scores, stable=True).tolist():
        label = int(labels[i])
        if label <= 0:
            continue
        x0, y0, x1, y1 = boxes[i].tolist()
        x0, x1 = sorted((min(max(x0, 0.0), width - 1.0), min(max(x1, 0.0), width - 1.0)))
        y0, y1 = sorted((min(max(y0, 0.0), height - 1.0), min(max(y1, 0.0), height - 1.0)))
        color = class_color(label)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=lw)
        name = class_names[label - 1] if label - 1 < len(class_names) else f"class {label}"
        _text_on_box(draw, (x0, y0), f"{name} {float(scores[i]):.2f}", color, font, (width, height))
    return _from_pil(picture)


def colorize_depth(depth: torch.Tensor, *, min_depth: float | None = None,
                   max_depth: float | None = None) -> torch.Tensor:
    """Colour-map a depth map in metres (H x W, or 1 x H x W) to a CPU uint8 3 x H x W picture.

    Near is bright yellow, far is dark blue. The range defaults to the 2nd..98th percentile of the valid
    (finite, > 0) values, so one outlier does not flatten the picture; pass `min_depth`/`max_depth` to compare
    pictures on a common scale. Invalid pixels are black.
    """
    depth = depth.detach().to("cpu", torch.float32)
    if depth.ndim == 3 and depth.shape[0] == 1:
        depth = depth[0]
    if depth.ndim != 2:
        raise ValueError(f"expected a depth map of shape H x W, got {tuple(depth.shape)}")
    valid = torch.isfinite(depth) & (depth > 0)
    values = depth[valid]
    lo = min_depth if min_depth is not None else (float(torch.quantile(values, 0.02)) if values.numel() else 0.0)
    hi = max_depth if max_depth is not None else (float(torch.quantile(values, 0.98)) if values.numel() else 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    t = ((torch.where(valid, depth, torch.full_like(depth, lo)) - lo) / (hi - lo)).clamp(0, 1).numpy()
    position = t * (len(_DEPTH_ANCHORS) - 1)
    low = np.floor(position).astype(np.int64).clip(0, len(_DEPTH_ANCHORS) - 2)
    frac = (position - low)[..., None]
    rgb = _DEPTH_ANCHORS[low] * (1 - frac) + _DEPTH_ANCHORS[low + 1] * frac
    rgb[~valid.numpy()] = 0
    return torch.from_numpy(np.round(rgb).astype(np.uint8)).permute(2, 0, 1).contiguous()


def normals_to_rgb(normals: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RGB-code surface normals (3 x H x W, any length) the way the ground-truth PNGs store them.

    Each vector is normalised, then v = (n + 1) * 127.5 (inverse of the shards' n = v / 127.5 - 1), so a
    prediction picture and a ground-truth PNG are directly comparable. Pixels where `mask` (H x W or 1 x H x W)
    is false, or whose vector is zero, are black. Returns CPU uint8 3 x H x W.
    """
    normals = normals.detach().to("cpu", torch.float32)
    if normals.ndim != 3 or normals.shape[0] != 3:
        raise ValueError(f"expected normals of shape 3 x H x W, got {tuple(normals.shape)}")
    norm = normals.norm(dim=0, keepdim=True)
    unit = normals / norm.clamp_min(1e-12)
    rgb = ((unit + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    invalid = (norm[0] < 1e-12) | ~torch.isfinite(norm[0])
    if mask is not None:
        invalid |= ~mask.detach().to("cpu").reshape(normals.shape[1:]).bool()
    rgb[:, invalid] = 0
    return rgb.contiguous()


def scene_picture(image: torch.Tensor, scene_name: str, score: float | None = None) -> torch.Tensor:
    """The image with a banner across its top reading the predicted scene type (and its probability).

    image: 3 x H x W uint8 (or float in [0, 1]) on any device. Returns CPU uint8 3 x H x W.
    """
    canvas = _to_cpu_image(image)
    _, height, width = canvas.shape
    picture = _to_pil(canvas)
    draw = ImageDraw.Draw(picture)
    font = _font(_label_font_size(height, width) + 2)
    text = scene_name.replace("_", " ") + (f"  {float(score):.2f}" if score is not None else "")
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    banner = min(height, bottom - top + 8)
    # Darken the strip under the text instead of covering it, so the picture stays visible.
    strip = canvas[:, :banner].float() * 0.35
    picture.paste(_to_pil(strip.round().to(torch.uint8)), (0, 0))
    draw.text((4 - left, 4 - top), text, fill=(255, 255, 255), font=font)
    return _from_pil(picture)


__all__ = ["class_color", "draw_detections", "colorize_depth", "normals_to_rgb", "scene_picture"]
