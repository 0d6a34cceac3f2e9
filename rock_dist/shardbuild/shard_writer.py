"""The shard member format (docs/data_format.md): encode one NYUv2 sample as tar members, write shards, check them.

Used by the shard builder (`rock_dist.shards build`) to write and by `shards verify` to check every member. A sample
is `{key}.{ext}` members with a dot-free key (`nyuv2_0004`, the 0-based .mat index), which is how WebDataset groups
them:

- `rgb.jpg` (JPEG quality 95) or `rgb.png`
- `depth.png`   16-bit grayscale PNG of round(depth_m * 1000) millimetres (0 = no reading)
- `normals.png` 8-bit RGB, n = v / 127.5 - 1; `mask.png` 8-bit gray 0/255 (present iff normals.png)
- or, with `aux_format="npy"`, the same values uncompressed as `depth.npy` (uint16, 1 x H x W), `normals.npy`
  (uint8, 3 x H x W) and `mask.npy` (uint8, 1 x H x W): about 3x larger, but read without PNG decoding (the
  reader's largest per-sample cost after the JPEG)
- `scene.cls`   ascii scene id 0..26
- `json`        {"image_id", "height", "width", "scene_type", "scene_name", "boxes" (inclusive xyxy), "labels"}

A missing modality is an absent member. Tars are written deterministically (fixed mtime/owner/order), so rebuilding
from the same sources gives byte-identical shards and checksums.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from rock_dist.data.constants import CLASS_NAMES, SCENE_TYPES
from rock_dist.data.manifest import ShardInfo, sha256_file
from rock_dist.data.npy_member import AUX_LAYOUT, encode_npy, read_npy
from rock_dist.shardbuild.nyuv2 import NormalPair, NYUSample, decode_png

RGB_EXTS = ("rgb.jpg", "rgb.png")
DEPTH_EXTS = ("depth.png", "depth.npy")
NORMALS_EXTS = ("normals.png", "normals.npy")
MASK_EXTS = ("mask.png", "mask.npy")
AUX_FORMATS = ("png", "npy")
KNOWN_EXTS = frozenset(RGB_EXTS + DEPTH_EXTS + NORMALS_EXTS + MASK_EXTS + ("scene.cls", "json"))
MAX_DEPTH_MM = np.iinfo(np.uint16).max


def sample_key(prefix: str, index: int) -> str:
    """`{prefix}_{index:04d}`: the dot-free WebDataset key of image `index`."""
    return f"{prefix}_{index:04d}"


def _encode(array: np.ndarray, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **params)
    return buf.getvalue()


def depth_millimetres(depth_m: np.ndarray) -> np.ndarray:
    """(H, W) metres -> uint16 millimetres; non-finite or negative readings become 0 (no reading)."""
    mm = np.where(np.isfinite(depth_m) & (depth_m > 0), np.rint(depth_m * 1000.0), 0.0)
    return np.clip(mm, 0, MAX_DEPTH_MM).astype(np.uint16)


def encode_depth_png(depth_m: np.ndarray) -> bytes:
    """(H, W) metres -> 16-bit PNG of millimetres (`depth_millimetres`)."""
    # compress_level 1: depth maps are large and noisy, higher levels cost several times more for a few % smaller.
    return _encode(depth_millimetres(depth_m), "PNG", compress_level=1)


def _is_plain_png(data: bytes, colour_type: int) -> bool:
    """True for an 8-bit PNG of the given IHDR colour type (2 = RGB, 0 = gray): safe to store byte-for-byte."""
    return (len(data) > 26 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
            and data[24] == 8 and data[25] == colour_type)


def encode_sample(sample: NYUSample, pair: NormalPair | None, *, key: str, image_format: str = "jpg",
                  jpeg_quality: int = 95, aux_format: str = "png") -> dict[str, bytes]:
    """The tar members of one sample, as {ext: bytes} in writing order."""
    if aux_format not in AUX_FORMATS:
        raise ValueError(f"aux_format must be one of {AUX_FORMATS}, not {aux_format!r}")
    height, width = sample.height, sample.width
    members: dict[str, bytes] = {}
    if image_format == "jpg":
        members["rgb.jpg"] = _encode(sample.rgb, "JPEG", quality=jpeg_quality)
    elif image_format == "png":
        members["rgb.png"] = _encode(sample.rgb, "PNG", compress_level=1)
    else:
        raise ValueError(f"image_format must be 'jpg' or 'png', not {image_format!r}")
    if sample.depth is not None:
        members["depth." + aux_format] = (encode_depth_png(sample.depth) if aux_format == "png"
                                          else encode_npy(depth_millimetres(sample.depth)[None]))
    if pair is not None:
        # Decoding validates both files (DataError naming the file if unreadable or of the wrong size).
        normals_u8 = decode_png(pair.normals_png, pair.normals_name, mode="RGB", size=(height, width))
        mask_raw = decode_png(pair.mask_png, pair.mask_name, mode="L", size=(height, width))
    if pair is not None and aux_format == "npy":
        members["normals.npy"] = encode_npy(normals_u8.transpose(2, 0, 1))
        members["mask.npy"] = encode_npy(np.where(mask_raw > 0, 255, 0).astype(np.uint8)[None])
    elif pair is not None:
        # The official PNGs are already in the shard encoding: keep them byte-exact unless they need normalising.
        members["normals.png"] = (pair.normals_png if _is_plain_png(pair.normals_png, 2)
                                  else _encode(normals_u8, "PNG"))
        binary = bool(((mask_raw == 0) | (mask_raw == 255)).all())
        members["mask.png"] = (pair.mask_png if binary and _is_plain_png(pair.mask_png, 0)
                               else _encode(np.where(mask_raw > 0, 255, 0).astype(np.uint8), "PNG"))
    if sample.scene_id is not None:
        members["scene.cls"] = str(sample.scene_id).encode("ascii")
    members["json"] = json.dumps({
        "image_id": sample.index, "height": height, "width": width,
        "scene_type": sample.scene_type, "scene_name": sample.scene_name,
        "boxes": sample.boxes.astype(int).tolist(), "labels": sample.labels.astype(int).tolist(),
    }, separators=(",", ":")).encode("utf-8")
    return members


def write_shard(path: str | os.PathLike[str], samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> ShardInfo:
    """Write (key, members) samples to a tar at `path` deterministically; returns its name, count and checksum."""
    path = Path(path)
    count = 0
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must not contain dots or slashes")
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o444
                tar.addfile(info, io.BytesIO(data))
            count += 1
    sha, size = sha256_file(path)
    return ShardInfo(name=path.name, num_samples=count, sha256=sha, bytes=size)


# --------------------------------------------------------------------------------------------------- checking
def _open_image(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()  # decode every pixel: a truncated stream fails here, not at training time
    return im


def check_sample(key: str, members: Mapping[str, bytes]) -> tuple[dict[str, Any], list[str]]:
    """Decode every member of one sample and check it against the format.

    Returns (facts, problems): facts has "image_id" (int or None), "size" ((H, W) of the decoded image, if any) and
    "modalities" (set of rgb/depth/normals/scene present); problems are readable one-line strings naming the member.
    """
    problems: list[str] = []
    facts: dict[str, Any] = {"image_id": None, "modalities": set()}

    def bad(ext: str, what: str) -> None:
        problems.append(f"{key}.{ext}: {what}")

    for ext in members:
        if ext not in KNOWN_EXTS:
            bad(ext, "unknown member")
    rgb_exts = [e for e in RGB_EXTS if e in members]
    if len(rgb_exts) != 1:
        problems.append(f"{key}: expected exactly one of rgb.jpg/rgb.png, found {len(rgb_exts)}")
    if "json" not in members:
        problems.append(f"{key}: json member missing")

    size: tuple[int, int] | None = None  # (W, H)
    for ext in rgb_exts:
        try:
            im = _open_image(members[ext])
            if im.mode != "RGB":
                bad(ext, f"mode {im.mode}, expected RGB")
            size = im.size
            facts["size"] = (size[1], size[0])
            facts["modalities"].add("rgb")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            bad(ext, f"does not decode ({err})")

    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except (UnicodeDecodeError, ValueError) as err:
            bad("json", f"does not parse ({err})")
            meta = {}
    if meta:
        image_id = meta.get("image_id")
        if not isinstance(image_id, int) or key.rsplit("_", 1)[-1] != f"{image_id:04d}":
            bad("json", f"image_id {image_id!r} does not match the key")
        else:
            facts["image_id"] = image_id
        if size is not None and (meta.get("width"), meta.get("height")) != size:
            bad("json", f"height/width {meta.get('height')}x{meta.get('width')} differ from the image "
                        f"{size[1]}x{size[0]}")
        boxes, labels = meta.get("boxes"), meta.get("labels")
        if not isinstance(boxes, list) or not isinstance(labels, list) or len(boxes) != len(labels):
            bad("json", "boxes and labels must be lists of equal length")
        else:
            w, h = size if size is not None else (meta.get("width", 0), meta.get("height", 0))
            for box, label in zip(boxes, labels):
                if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box)
                        and 0 <= box[0] <= box[2] < w and 0 <= box[1] <= box[3] < h):
                    bad("json", f"box {box} is not an inclusive xyxy box inside the {w}x{h} image")
                    break
                if not isinstance(label, int) or not 1 <= label <= len(CLASS_NAMES):
                    bad("json", f"label {label!r} is not a class id 1..{len(CLASS_NAMES)}")
                    break

    def check_png(ext: str, modes: tuple[str, ...]) -> bool:
        try:
            im = _open_image(members[ext])
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            bad(ext, f"does not decode ({err})")
            return False
        if im.format != "PNG" or im.mode not in modes:
            bad(ext, f"{im.format} {im.mode}, expected a PNG of mode {'/'.join(modes)}")
            return False
        if size is not None and im.size != size:
            bad(ext, f"size {im.size[1]}x{im.size[0]} differs from the image {size[1]}x{size[0]}")
            return False
        return True

    def check_npy(ext: str) -> bool:
        type_name, channels = AUX_LAYOUT[ext.split(".")[0]]
        dtype = np.dtype(type_name)
        try:
            array = read_npy(members[ext])
        except ValueError as err:
            bad(ext, f"does not load as .npy ({err})")
            return False
        expected = (channels, size[1], size[0]) if size is not None else None
        if array.dtype != dtype or array.ndim != 3 or array.shape[0] != channels or \
                (expected is not None and array.shape != expected):
            bad(ext, f"{array.dtype} array of shape {array.shape}, expected {dtype} of shape "
                     f"{expected or (channels, 'H', 'W')}")
            return False
        return True

    def check_aux(ext: str, png_modes: tuple[str, ...]) -> bool:
        return check_npy(ext) if ext.endswith(".npy") else check_png(ext, png_modes)

    depth = [e for e in DEPTH_EXTS if e in members]
    normals = [e for e in NORMALS_EXTS if e in members]
    masks = [e for e in MASK_EXTS if e in members]
    for found in (depth, normals, masks):
        if len(found) > 1:
            problems.append(f"{key}: both {' and '.join(found)}; keep one")
    if len(depth) == 1 and check_aux(depth[0], ("I;16", "I;16B", "I")):
        facts["modalities"].add("depth")
    if bool(normals) != bool(masks):
        problems.append(f"{key}: normals and mask members must be present together "
                        f"(found {', '.join(normals + masks)})")
    elif len(normals) == 1 and len(masks) == 1:
        if check_aux(normals[0], ("RGB",)) & check_aux(masks[0], ("L",)):
            facts["modalities"].add("normals")
    if "scene.cls" in members:
        text = members["scene.cls"].decode("ascii", "replace").strip()
        if not text.isdigit() or not 0 <= int(text) < len(SCENE_TYPES):
            bad("scene.cls", f"{text!r} is not a scene id 0..{len(SCENE_TYPES) - 1}")
        else:
            facts["modalities"].add("scene")
            scene_type = meta.get("scene_type")
            if scene_type is not None and scene_type != SCENE_TYPES[int(text)]:
                bad("scene.cls", f"id {text} is {SCENE_TYPES[int(text)]!r} but json says {scene_type!r}")
    return facts, problems


__all__ = ["encode_sample", "encode_depth_png", "depth_millimetres", "write_shard", "check_sample",
           "sample_key", "KNOWN_EXTS", "RGB_EXTS", "DEPTH_EXTS", "NORMALS_EXTS", "MASK_EXTS", "AUX_FORMATS"]
