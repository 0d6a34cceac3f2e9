"""Decoding of shard samples and the joint augmentation of ROCK (image, boxes, depth, normals), on tensors.

Called by `rock_dist.data.pipeline` inside the loader workers (one sample at a time, single-threaded) and by the
data benchmark. With `--augment_on device` (`TrainTransform(defer_augment=True)`) the workers only decode and draw
the random parameters here; `rock_dist.data.device_augment` applies the same geometry batched on the training
device, reusing `centre_indices` and the `Geometry` zoom rules below. Everything works on uint8/uint16/float
tensors decoded with `torchvision.io` (no PIL round trip); geometry is applied to the crop before resizing, and the
auxiliary maps are sampled directly at the small target size (h, w) instead of being resized at full resolution.

Training augmentation follows the reference (vita-epfl/rock-pytorch, `rock/datasets/transforms.py`; see
docs/augmentation.md):

1. SSD random crop. One option is drawn uniformly from
   ``[0.1, 0.3, 0.5, 0.7, 0.9, free, free, none]`` (``force_crops`` removes ``none`` and the second ``free``,
   leaving six options). ``none`` keeps the image. Otherwise up to 30 candidates are drawn: side fraction
   ``s = sqrt(U(0.1, 1))`` used for BOTH width and height (the crop keeps the image's aspect ratio; area 0.1–1),
   ``left ~ U(0, 1 - s)``, ``top ~ U(0, 1 - s)``. A candidate is accepted when every box has IoU > min_iou with it
   (no constraint for ``free``) and at least one box centre lies strictly inside it; boxes whose centre is outside
   are dropped, the others are clipped to the crop. If no candidate of 30 is accepted, a new option is drawn.
   Images without boxes are never cropped (as in the reference).
2. Horizontal flip with probability 0.5.
3. Resize to the network input size (bilinear, antialiased).
4. ColorJitter(brightness=0.15, contrast=0.25, saturation=0.25, hue=0.05): the four operations in random order,
   each clamped to the valid range, hue as a rotation in HSV space — torchvision's semantics, computed in float32
   in one pass (`apply_color_jitter`). By default (``jitter="device"``) the worker only DRAWS the parameters and
   ships them with the sample (batch key ``color_jitter``, B x 8); the batched augmentation step
   (`rock_dist.data.device_augment`) applies them on the training device. Jitter is the most expensive CPU step
   (HSV hue on 480x640: more than decoding the three PNGs) and costs microseconds on a GPU. ``jitter="cpu"``
   applies it in the worker instead (same parameters, same result up to float rounding); ``"none"`` skips it.

Difference from the reference, on purpose: the crop is quantised to whole pixels FIRST and the boxes, IoU test and
zoom are computed from that pixel crop, so boxes match the pixels exactly (the reference normalised boxes by the
continuous crop and cut the image at truncated pixel positions, a sub-pixel mismatch).

Box convention (the reference's, shared with evaluation): a stored inclusive pixel box [x0, y0, x1, y1] is
normalised as (x0 / W, y0 / H, x1 / W, y1 / H); evaluation maps back by multiplying with the stored size, which gives
the COCO width x1 - x0 (docs/data_format.md, docs/evaluation.md).

Auxiliary targets come from the registered tasks (rock_dist.tasks, docs/architecture.md "Auxiliary tasks"): each
task decodes its own members (`AuxTask.decode`, fields of `DecodedSample`), says whether the sample has its target
(the `has_*` flag) and, for dense targets, samples its maps at (h, w) on the index grid built here (`MapGrid`: nearest
sampling at pixel centres of the cropped, flipped maps). The built-in tasks' rules:

- depth (metres) divided by the crop zoom; normals decoded as n = v / 127.5 - 1, flip negates x, zoom applied,
  renormalised; normals are 0 where the mask is invalid and everywhere when the sample has no normals.
- Zoom. Crop-and-resize magnifies the image by zx = W / crop_w horizontally and zy = H / crop_h vertically
  (relative to the uncropped image resized to the same input). The crop is meant to keep the aspect ratio, but
  pixel quantisation makes zx and zy differ slightly, so both are defined for the general case:
  * For a pinhole camera a magnification z of the image is a focal length multiplied by z. An object then looks
    as it would at depth d / z with the original focal length, which is what a network with fixed intrinsics
    must predict: depth is divided by the zoom. With zx != zy no single depth matches both directions; we use the
    geometric mean zoom = sqrt(zx * zy), which preserves the object's apparent AREA.
  * The same focal change, expressed on the scene, scales X by zx and Y by zy (Z unchanged); normals transform by
    the inverse transpose of diag(zx, zy, 1), i.e. n' ~ (nx / zx, ny / zy, nz) then renormalised. With zx = zy = z
    this is exactly the reference's rule "multiply z by the zoom, renormalise".

`EvalTransform` is deterministic: resize only (zoom 1, no flip, no jitter).
"""

from __future__ import annotations

import json
import math
import random
from typing import Any, Literal, Mapping

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg, decode_png

from rock_dist.data.geometry import Geometry
from rock_dist.data.members import aux_member, bytes_tensor, quiet_torchvision_io
from rock_dist.errors import DataError
from rock_dist.tasks import registry
from rock_dist.tasks.base import MapGrid

Size = tuple[int, int]


IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Crop options of the reference: minimum IoU with every box, None = unconstrained ("free").
_CROP_MIN_IOUS: tuple[float | None, ...] = (0.1, 0.3, 0.5, 0.7, 0.9, None)
_NO_CROP = "none"
_CROP_TRIALS = 30
# The reference loops forever until an option succeeds; "free" and "none" make that terminate almost surely.
# The cap only guards against pathological boxes and keeps the sample uncropped (deterministically) if reached.
_MAX_OPTION_DRAWS = 1000

# ColorJitter(0.15, 0.25, 0.25, 0.05) of the reference.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.15, 0.25, 0.25, 0.05
# torchvision's grayscale weights (ITU-R 601-2 luma), used by contrast and saturation.
_GRAY = (0.2989, 0.587, 0.114)

# Shard members (docs/data_format.md).
RGB_MEMBERS = ("rgb.jpg", "rgb.png")


# ------------------------------------------------------------------------------------------------------ decoding
class DecodedSample:
    """One shard sample decoded to tensors at its stored resolution (nothing resized yet).

    image: uint8 3 x H x W; boxes: float32 N x 4 normalised xyxy (x0/W, y0/H, x1/W, y1/H); labels: int64 N; and
    `fields`, what each auxiliary task decoded from its members (rock_dist.tasks: `AuxTask.decode`, e.g. depth_mm
    uint16 1 x H x W or None; normals uint8 3 x H x W and normals_mask uint8 1 x H x W or None; scene id or -1),
    also readable and writable as attributes (`s.depth_mm`). A field a task declares but the constructor was not
    given takes the task's absent value.
    With `decode_sample(..., defer_jpeg=True)` a JPEG image stays undecoded: `image` holds its bytes (uint8 1-D) and
    `encoded_size` its (H, W) from the JPEG header (`rock_dist.data.device_decode` decodes it later).
    """

    def __init__(self, key: str, image_id: int, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                 encoded_size: Size | None = None, **fields: Any) -> None:
        self.key = key
        self.image_id = image_id
        self.image = image
        self.boxes = boxes
        self.labels = labels
        self.encoded_size = encoded_size
        absent = {name: value for task in registry.all_tasks() for name, value in task.decoded_fields.items()}
        self.fields: dict[str, Any] = {**absent, **fields}

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not plain attributes; __dict__ lookup avoids recursion while unpickling.
        fields = self.__dict__.get("fields")
        if fields is not None and name in fields:
            return fields[name]
        raise AttributeError(f"{type(self).__name__!r} has no attribute or decoded field {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        fields = self.__dict__.get("fields")
        if fields is not None and name in fields:
            fields[name] = value
        else:
            super().__setattr__(name, value)

    @property
    def size(self) -> Size:
        if self.encoded_size is not None:
            return self.encoded_size
        return int(self.image.shape[1]), int(self.image.shape[2])

    @property
    def deferred(self) -> bool:
        """Whether `image` is still the JPEG's bytes."""
        return self.encoded_size is not None


# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic): they carry the size.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_size(data: bytes) -> Size:
    """(H, W) of a JPEG from its frame header, without decoding it. DataError when there is none."""
    if data[:2] != b"\xff\xd8":
        raise DataError("not a JPEG (no start-of-image marker)")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise DataError(f"corrupt JPEG: no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length field
            i += 2
            continue
        if marker in _SOF_MARKERS and i + 9 <= n:
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    raise DataError("corrupt JPEG: no frame header before the end of the data")


def decode_sample(raw: Mapping[str, Any], *, where: str = "", defer_jpeg: bool = False) -> DecodedSample:
    """Decode the members of one WebDataset sample (docs/data_format.md) into a `DecodedSample`.

    `raw` maps member suffixes ('rgb.jpg', 'depth.png', 'json', ...) to bytes, plus '__key__'. `where` names the
    shard for error messages. Absent optional members become None / -1; malformed members raise DataError.
    `defer_jpeg`: leave an rgb.jpg undecoded (its size read from the header; see `DecodedSample`).
    """
    with quiet_torchvision_io():
        return _decode_sample(raw, where, defer_jpeg)


def decode_rgb(data: torch.Tensor, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """An RGB JPEG's bytes (uint8 1-D) as uint8 3 x H x W on `device` (grey JPEGs repeated to 3 channels)."""
    with quiet_torchvision_io():
        image = decode_jpeg(data, device=device)
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def _decode_sample(raw: Mapping[str, Any], where: str, defer_jpeg: bool = False) -> DecodedSample:
    key = str(raw.get("__key__", "?"))
    loc = f"sample {key!r}" + (f" in shard {where}" if where else "")
    rgb_name = next((m for m in RGB_MEMBERS if m in raw), None)
    if rgb_name is None or "json" not in raw:
        missing = [m for m in ("rgb.jpg|rgb.png", "json") if (m == "json" and "json" not in raw)
                   or (m != "json" and rgb_name is None)]
        raise DataError(f"{loc}: required member(s) {', '.join(missing)} missing (members: "
                        f"{sorted(k for k in raw if not k.startswith('__'))}); rebuild the shard with "
                        "`python -m rock_dist.shards build`")
    try:
        meta = json.loads(raw["json"])
        data = bytes_tensor(raw[rgb_name])
        encoded_size = None
        if defer_jpeg and rgb_name.endswith("jpg"):
            image = data
            H, W = encoded_size = jpeg_size(bytes(raw[rgb_name]))
        else:
            image = decode_rgb(data) if rgb_name.endswith("jpg") else decode_png(data, mode=ImageReadMode.RGB)
            H, W = int(image.shape[1]), int(image.shape[2])
        if (int(meta.get("height", H)), int(meta.get("width", W))) != (H, W):
            raise DataError(f"{loc}: json says {meta.get('height')}x{meta.get('width')} but {rgb_name} is {H}x{W}")
        boxes_px = torch.tensor(meta.get("boxes", []), dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(meta.get("labels", []), dtype=torch.int64).reshape(-1)
        if boxes_px.shape[0] != labels.shape[0]:
            raise DataError(f"{loc}: {boxes_px.shape[0]} boxes but {labels.shape[0]} labels in json")
        if labels.numel() and int(labels.min()) < 1:
            raise DataError(f"{loc}: class labels must be >= 1 (0 is background), got {labels.tolist()}")
        boxes = boxes_px / torch.tensor([W, H, W, H], dtype=torch.float32)

        fields: dict[str, Any] = {}
        for task in registry.all_tasks():
            fields.update(task.decode(raw, (H, W), loc))
        image_id = int(meta["image_id"])
    except DataError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise DataError(f"{loc}: cannot decode ({type(err).__name__}: {err}); the shard is corrupt — rebuild it "
                        "or check it with `python -m rock_dist.shards verify`") from err
    return DecodedSample(key=key, image_id=image_id, image=image, boxes=boxes, labels=labels,
                         encoded_size=encoded_size, **fields)


# ---------------------------------------------------------------------------------------------------- geometry
def _min_iou_above(boxes: list[tuple[float, float, float, float]], crop: tuple[float, float, float, float],
                   threshold: float) -> bool:
    """True if every box has IoU > threshold with `crop` (all xyxy; degenerate boxes have IoU 0)."""
    cx0, cy0, cx1, cy1 = crop
    crop_area = (cx1 - cx0) * (cy1 - cy0)
    for x0, y0, x1, y1 in boxes:
        iw = min(x1, cx1) - max(x0, cx0)
        ih = min(y1, cy1) - max(y0, cy0)
        inter = iw * ih if iw > 0 and ih > 0 else 0.0
        union = max(x1 - x0, 0.0) * max(y1 - y0, 0.0) + crop_area - inter
        if not inter / max(union, 1e-12) > threshold:
            return False
    return True


def sample_ssd_crop(boxes: torch.Tensor, image_size: Size, rng: random.Random, *,
                    force_crops: bool = False) -> tuple[tuple[int, int, int, int], torch.Tensor] | None:
    """Draw the reference's SSD crop for normalised xyxy `boxes` (N x 4) of an image of `image_size` (H, W).

    Returns ((x0, y0, x1, y1) pixel crop with exclusive ends, kept-box mask N) or None for "no crop".
    Pure Python over the few boxes: many candidates are rejected, and per-candidate tensor ops would cost more than
    the whole image pipeline.
    """
    if boxes.shape[0] == 0:
        return None
    options: list[float | None | str] = list(_CROP_MIN_IOUS)
    if not force_crops:
        # The reference adds "do nothing" and a second unconstrained option, so 7 of 8 draws ask for a crop.
        options += [_NO_CROP, None]
    H, W = image_size
    box_list = [tuple(b) for b in boxes.tolist()]
    centres = [(0.5 * (b[0] + b[2]), 0.5 * (b[1] + b[3])) for b in box_list]
    for _ in range(_MAX_OPTION_DRAWS):
        mode = rng.choice(options)
        if mode == _NO_CROP:
            return None
        for _ in range(_CROP_TRIALS):
            side = math.sqrt(rng.uniform(0.1, 1.0))
            left = rng.uniform(0.0, 1.0 - side)
            top = rng.uniform(0.0, 1.0 - side)
            # Quantise to pixels first so that boxes, IoU and zoom all refer to the pixels actually kept.
            x0, x1 = int(left * W), min(W, max(int((left + side) * W), int(left * W) + 1))
            y0, y1 = int(top * H), min(H, max(int((top + side) * H), int(top * H) + 1))
            crop = (x0 / W, y0 / H, x1 / W, y1 / H)
            if mode is not None and not _min_iou_above(box_list, crop, float(mode)):
                continue
            keep = [crop[0] < cx < crop[2] and crop[1] < cy < crop[3] for cx, cy in centres]
            if not any(keep):
                continue
            return (x0, y0, x1, y1), torch.tensor(keep, dtype=torch.bool)
    return None


def crop_boxes(boxes: torch.Tensor, crop_px: tuple[int, int, int, int], image_size: Size) -> torch.Tensor:
    """Clip normalised xyxy boxes to a pixel crop and re-normalise them to the crop (result in [0, 1])."""
    H, W = image_size
    x0, y0, x1, y1 = crop_px
    lo = torch.tensor([x0 / W, y0 / H, x0 / W, y0 / H])
    hi = torch.tensor([x1 / W, y1 / H, x1 / W, y1 / H])
    return (torch.minimum(torch.maximum(boxes, lo), hi) - lo) / (hi - lo)


def flip_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Mirror normalised xyxy boxes horizontally."""
    out = boxes.clone()
    out[:, 0] = 1.0 - boxes[:, 2]
    out[:, 2] = 1.0 - boxes[:, 0]
    return out


def centre_indices(start: torch.Tensor, length: torch.Tensor, n: int, flip: torch.Tensor) -> torch.Tensor:
    """Source indices (int64 B x n) of `n` nearest samples at pixel centres over [start, start + length) per row of
    the int64 B-vectors `start` and `length`, mirrored where the bool B-vector `flip` is set. The workers call it
    with B = 1 per sample, `rock_dist.data.device_augment` with the whole batch: the same float64 arithmetic."""
    idx = ((torch.arange(n, dtype=torch.float64) + 0.5)[None] * (length.to(torch.float64) / n)[:, None]).floor()
    idx = torch.minimum(idx.long().clamp_(min=0), (length - 1)[:, None])
    # Sample the unflipped crop, then mirror the small map: flipping and sampling then commute exactly.
    idx = torch.where(flip[:, None], idx.flip(1), idx)
    return idx + start[:, None]


def _centre_indices(start: int, length: int, n: int, flip: bool) -> torch.Tensor:
    return centre_indices(torch.tensor([start]), torch.tensor([length]), n, torch.tensor([flip]))[0]


def sample_aux_maps(s: DecodedSample, geom: Geometry, target_size: Size) -> dict[str, torch.Tensor]:
    """The dense targets of every map task (`AuxTask.sample_maps`) at `target_size` (h, w) following `geom` (crop,
    flip, zoom): e.g. depth float32 1 x h x w (metres / zoom, 0 if missing), normals float32 3 x h x w (unit, 0
    where invalid or missing), normals_mask bool 1 x h x w.
    """
    h, w = target_size
    rows = _centre_indices(geom.y0, geom.y1 - geom.y0, h, False)
    cols = _centre_indices(geom.x0, geom.x1 - geom.x0, w, geom.flip)
    grid = MapGrid(rows, cols, geom)
    out: dict[str, torch.Tensor] = {}
    for task in registry.all_tasks():
        if task.target_kind == "map":
            out.update(task.sample_maps(s.fields, grid))
    return out


def task_values(s: DecodedSample) -> dict[str, Any]:
    """The per-image values of the tasks: each label task's label, then every task's presence flag (docs/data_format.md
    key order: labels, flags)."""
    tasks = [task for task in registry.all_tasks() if task.target_kind is not None]
    out = {key: s.fields[key] for task in tasks if task.target_kind == "label" for key in task.target_keys}
    out.update((task.presence_key, task.present(s.fields)) for task in tasks)
    return out


# ------------------------------------------------------------------------------------------------------- colour
def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of (..., 3, H, W) → (..., H, W)."""
    r, g, b = x.unbind(-3)
    return (r * _GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2])


def adjust_hue(x: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of a float (..., 3, H, W) image (any value range, e.g. [0, 255]) by `shift` turns.

    `shift` is a number or a tensor broadcastable to (..., H, W) (e.g. B x 1 x 1 for per-image shifts).
    Same result as torchvision's adjust_hue (RGB -> HSV, shift, HSV -> RGB; equal to 1e-5) but about 4x faster on
    one core: V = max and C = max - min are unchanged by a hue rotation, so only the hue h (in sextants) is computed
    and each channel is rebuilt in closed form, c_n = V - C * clamp(2 - |k - 2|, 0, 1) with k = (n + h) mod 6 and
    n = 5, 3, 1 for R, G, B. Case selection uses float masks and the modulo uses frac(), because torch.where and
    remainder are several times slower than plain arithmetic on CPU.
    """
    r, g, b = x.unbind(-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)
    is_r = (maxc == r).to(x.dtype)
    is_g = (maxc == g).to(x.dtype).mul_(1.0 - is_r)  # r wins ties, as in torchvision
    is_b = (1.0 - is_r).sub_(is_g)
    # h * C per case: red max -> (g - b), green max -> (b - r) + 2C, blue max -> (r - g) + 4C.
    h = (g - b).mul_(is_r)
    h.add_((b - r).add_(chroma, alpha=2.0).mul_(is_g))
    h.add_((r - g).add_(chroma, alpha=4.0).mul_(is_b))
    h.div_(chroma.clamp(min=1e-12))  # grey pixels: numerator 0 -> hue 0, output = V
    # +12 keeps h positive so that frac() is a true modulo (h >= -1 - 6 * |shift|).
    h.add_(6.0 * shift + 12.0).div_(6.0)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.add(h, n / 6.0).frac_().mul_(6.0)
        f = k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
        channels.append(torch.sub(maxc, f.mul_(chroma)))
    # Every output lies in [min, max] of its input pixel, so no clamping is needed.
    return torch.stack(channels, dim=-3)


def draw_jitter_params(rng: random.Random, brightness: float = BRIGHTNESS, contrast: float = CONTRAST,
                       saturation: float = SATURATION, hue: float = HUE) -> torch.Tensor:
    """ColorJitter parameters as float32 [8]: the order of the 4 operations (0 brightness, 1 contrast,
    2 saturation, 3 hue), then the brightness, contrast, saturation factors ~ U(1 - v, 1 + v) and the hue shift
    ~ U(-v, v), torchvision's distributions."""
    order = [0, 1, 2, 3]
    rng.shuffle(order)
    factors = [rng.uniform(1 - brightness, 1 + brightness), rng.uniform(1 - contrast, 1 + contrast),
               rng.uniform(1 - saturation, 1 + saturation), rng.uniform(-hue, hue)]
    return torch.tensor(order + factors, dtype=torch.float32)


def _jitter_op(op: int, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """One ColorJitter operation on float B x 3 x H x W in [0, 255] with per-image factors B x 1 x 1 x 1."""
    if op == 0:
        return x.mul_(factor).clamp_(0.0, 255.0)
    if op == 1:
        mean = _gray(x).mean(dim=(-2, -1)).view(-1, 1, 1, 1)
        return x.mul_(factor).add_((1.0 - factor) * mean).clamp_(0.0, 255.0)
    if op == 2:
        gray = _gray(x).unsqueeze(-3)
        return x.mul_(factor).add_(gray.mul_(1.0 - factor)).clamp_(0.0, 255.0)
    return adjust_hue(x, factor.view(-1, 1, 1))


def apply_color_jitter(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply `draw_jitter_params` results: images (B x) 3 x H x W uint8 or float in [0, 255], params (B x) 8.

    torchvision's ColorJitter semantics (per-image random order, each operation clamped), computed in float32 and
    rounded once at the end (torchvision on uint8 truncates after every operation: a few grey levels apart).
    Returns the input dtype (float results are rounded too, so CPU and device paths agree). Runs on the images'
    device, batched: `rock_dist.data.device_augment` calls it on the accelerator for deferred jitter.
    """
    single = images.dim() == 3
    x = images.unsqueeze(0) if single else images
    if x.device.type == "cpu" and x.shape[0] > 1:
        # On a CPU, image by image: a whole batch of float temporaries (236 MB at 64 x 480 x 640) thrashes the
        # caches and the allocator and runs several times slower than the same work done per image.
        p = params.reshape(-1, 8)
        return torch.stack([apply_color_jitter(img, p[i]) for i, img in enumerate(x)])
    # Which images each operation touches is decided on the host: `params` come from the CPU batch
    # (`prepare_batch` keeps them there), so selecting images never waits for the device (torch.nonzero on a
    # device tensor would, 16 times per batch).
    order = params.reshape(-1, 8)[:, :4].detach().cpu().round().long()
    p = params.reshape(-1, 8).to(device=x.device, dtype=torch.float32, non_blocking=True)
    x = x.to(torch.float32, copy=True)
    factors = p[:, 4:].view(-1, 4, 1, 1, 1)
    B = x.shape[0]
    for position in range(4):
        ops = order[:, position]
        for op in range(4):
            if B == 1:
                if int(ops[0]) == op:
                    x = _jitter_op(op, x, factors[:, op])
                continue
            idx = torch.nonzero(ops == op, as_tuple=True)[0]
            if idx.numel():
                idx = idx.to(x.device, non_blocking=True)
                x[idx] = _jitter_op(op, x[idx], factors[idx, op])
    x = x.round_()
    if images.dtype == torch.uint8:
        x = x.to(torch.uint8)
    return x[0] if single else x


def color_jitter(image: torch.Tensor, rng: random.Random, brightness: float = BRIGHTNESS,
                 contrast: float = CONTRAST, saturation: float = SATURATION, hue: float = HUE) -> torch.Tensor:
    """ColorJitter on a uint8 3 x H x W image with parameters drawn from `rng`; returns uint8."""
    return apply_color_jitter(image, draw_jitter_params(rng, brightness, contrast, saturation, hue))


# --------------------------------------------------------------------------------------------------- transforms
def _resize_image(image: torch.Tensor, size: Size) -> torch.Tensor:
    if tuple(image.shape[1:]) == tuple(size):
        return image
    return TF.resize(image, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def crop_flip_resize(image: torch.Tensor, geom: Geometry, size: Size) -> torch.Tensor:
    """The training image's geometry: the pixel crop of `geom`, its flip, then the resize to `size` (on the
    image's device; the loader workers and `rock_dist.data.device_decode` run this same function)."""
    image = image[:, geom.y0:geom.y1, geom.x0:geom.x1]  # a view: the crop costs nothing until the resize reads it
    if geom.flip:
        image = image.flip(-1)
    return _resize_image(image.contiguous(), size).contiguous()


def _finish(s: DecodedSample, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
            aux: dict[str, torch.Tensor], geom: Geometry) -> dict[str, Any]:
    return {
        "image": image,
        "boxes": boxes.clamp_(0.0, 1.0),
        "labels": labels,
        **task_values(s),
        **aux,
        "image_id": s.image_id,
        "orig_size": s.size,
        "geometry": geom,
    }


def deferred_sample(s: DecodedSample, geom: Geometry, keep: torch.Tensor, jitter: torch.Tensor | None
                    ) -> dict[str, Any]:
    """The sample as decoded plus the parameters drawn for it (`--augment_on device`): its crop and flip, the crop's
    kept-box mask `keep` and the jitter parameters (None: no jitter). `rock_dist.data.batch.collate` pads the maps;
    the batched step of `rock_dist.data.device_augment` crops, flips, resizes and samples the targets."""
    raw = {key: s.fields[field] for task in registry.all_tasks() if task.target_kind == "map"
           for field, key in task.raw_keys.items()}
    out = {"raw_image": s.image, **raw, "boxes": s.boxes, "labels": s.labels, "box_keep": keep,
           "augment_geometry": torch.tensor(geom.as_row(), dtype=torch.int64),
           **task_values(s), "image_id": s.image_id, "orig_size": s.size, "geometry": geom}
    if jitter is not None:
        out["color_jitter"] = jitter
    return out


class TrainTransform:
    """Reference training augmentation (see the module docstring) on a `DecodedSample`.

    Returns a dict of per-sample tensors: image uint8 3 x H x W (network input size), boxes float32 N x 4 normalised
    xyxy, labels int64 N, depth float32 1 x h x w, normals float32 3 x h x w, normals_mask bool 1 x h x w, plus
    scene / has_* / image_id / orig_size and the `geometry` drawn (for tests and debugging).
    """

    def __init__(self, image_size: Size, target_size: Size, *, force_crops: bool = False, no_crops: bool = False,
                 flip_p: float = 0.5, jitter: Literal["device", "cpu", "none"] = "device",
                 defer_decode: bool = False, defer_augment: bool = False) -> None:
        if jitter not in ("device", "cpu", "none"):
            raise ValueError(f"jitter must be 'device', 'cpu' or 'none', not {jitter!r}")
        if (defer_decode or defer_augment) and jitter == "cpu":
            raise ValueError("jitter 'cpu' needs the pixels in the worker; with deferred decoding or augmentation "
                             "use 'device'")
        if defer_decode and defer_augment:
            raise ValueError("deferred decoding and deferred augmentation do not combine")
        self.defer_decode = defer_decode
        self.defer_augment = defer_augment
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.target_size = (int(target_size[0]), int(target_size[1]))
        if force_crops and no_crops:
            raise ValueError("force_crops and no_crops contradict each other")
        self.force_crops = force_crops
        self.no_crops = no_crops
        self.flip_p = flip_p
        self.jitter = jitter

    def __call__(self, s: DecodedSample, rng: random.Random) -> dict[str, Any]:
        H, W = s.size
        boxes, labels = s.boxes, s.labels
        crop = None if self.no_crops else sample_ssd_crop(boxes, (H, W), rng, force_crops=self.force_crops)
        if crop is None:
            x0, y0, x1, y1 = 0, 0, W, H
            keep = torch.ones(labels.shape[0], dtype=torch.bool)
        else:
            (x0, y0, x1, y1), keep = crop
        flip = rng.random() < self.flip_p
        geom = Geometry(x0, y0, x1, y1, flip, (H, W))
        # Drawn in every mode so that the random stream (and so crops of later samples) never depends on it.
        jitter = draw_jitter_params(rng)
        if self.defer_augment:
            return deferred_sample(s, geom, keep, jitter if self.jitter == "device" else None)

        if crop is not None:
            boxes = crop_boxes(boxes[keep], (x0, y0, x1, y1), (H, W))
            labels = labels[keep]
        if flip:
            boxes = flip_boxes(boxes)
        aux = sample_aux_maps(s, geom, self.target_size)
        if s.deferred:
            # The JPEG travels undecoded with its geometry; rock_dist.data.device_decode finishes the image in the
            # main process, batched on the GPU, with crop_flip_resize as here.
            out = _finish(s, s.image, boxes, labels, aux, geom)
            out["jpeg_geometry"] = torch.tensor(geom.as_row(), dtype=torch.int64)
        else:
            image = crop_flip_resize(s.image, geom, self.image_size)
            if self.jitter == "cpu":
                image = apply_color_jitter(image, jitter)
            out = _finish(s, image, boxes, labels, aux, geom)
        if self.jitter == "device":
            # Deferred: rock_dist.data.device_augment applies it batched on the training device, after the resize
            # exactly like
            # the reference (Resize, then ColorJitter). It is the costliest CPU step (HSV hue), ~free on a GPU.
            out["color_jitter"] = jitter
        return out


class EvalTransform:
    """Deterministic evaluation transform: resize to the network input, aux maps at the target size, zoom 1."""

    def __init__(self, image_size: Size, target_size: Size) -> None:
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.target_size = (int(target_size[0]), int(target_size[1]))

    def __call__(self, s: DecodedSample, rng: random.Random | None = None) -> dict[str, Any]:
        H, W = s.size
        geom = Geometry(0, 0, W, H, False, (H, W))
        image = _resize_image(s.image, self.image_size).contiguous()
        aux = sample_aux_maps(s, geom, self.target_size)
        return _finish(s, image, s.boxes.clone(), s.labels.clone(), aux, geom)


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "DecodedSample", "decode_sample", "aux_member", "Geometry", "sample_ssd_crop",
    "crop_boxes", "flip_boxes", "centre_indices", "sample_aux_maps", "task_values", "adjust_hue", "draw_jitter_params",
    "apply_color_jitter", "color_jitter", "crop_flip_resize", "deferred_sample", "decode_rgb", "jpeg_size",
    "TrainTransform", "EvalTransform",
]
