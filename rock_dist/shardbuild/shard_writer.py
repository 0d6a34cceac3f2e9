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
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from rock_dist.data.constants import CLASS_NAMES
from rock_dist.data.manifest import ShardInfo, sha256_file
from rock_dist.data.npy_member import encode_npy, read_npy
from rock_dist.shardbuild.nyuv2 import NormalPair, NYUSample, decode_png
from rock_dist.tasks import catalog

RGB_EXTS = ("rgb.jpg", "rgb.png")
AUX_FORMATS = catalog.MAP_ENCODINGS
MAX_DEPTH_MM = np.iinfo(np.uint16).max


def known_exts() -> frozenset[str]:
    """Every member name a sample may hold: the image, its json and the auxiliary tasks' (rock_dist.tasks.catalog)."""
    return frozenset(RGB_EXTS + ("json",) + tuple(ext for spec in catalog.specs() for ext in spec.member_exts))


def modalities_of(members: Iterable[str]) -> set[str]:
    """The manifest modalities a sample's member names show, without decoding them: rgb when it has its json (every
    built sample has both), a task when it has the member marking it (rock_dist.tasks.catalog)."""
    names = set(members)
    found = {"rgb"} if "json" in names else set()
    return found | {spec.name for spec in catalog.specs() if names.intersection(spec.marker_exts)}


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

    known = known_exts()
    for ext in members:
        if ext not in known:
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
        layout = catalog.map_member(ext.split(".")[0])
        dtype, channels = np.dtype(layout.dtype), layout.channels
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

    def check_aux(ext: str) -> bool:
        stem, encoding = ext.split(".")
        return check_npy(ext) if encoding == "npy" else check_png(ext, catalog.map_member(stem).png_modes)

    for spec in catalog.in_shard_order():
        if spec.maps and _check_maps(key, members, spec, check_aux, problems):
            facts["modalities"].add(spec.name)
        elif spec.label is not None and spec.label in members and spec.check_label is not None:
            present, found = spec.check_label(members[spec.label].decode("ascii", "replace").strip(), meta)
            for what in found:
                bad(spec.label, what)
            if present:
                facts["modalities"].add(spec.name)
    return facts, problems


def _check_maps(key: str, members: Mapping[str, bytes], spec: catalog.TaskSpec, check_aux: Callable[[str], bool],
                problems: list[str]) -> bool:
    """Check the dense members of task `spec` (each stored once at most, all of them or none); True when the sample
    has them all and each passes `check_aux`."""
    found = [[ext for ext in member.exts if ext in members] for member in spec.maps]
    for exts in found:
        if len(exts) > 1:
            problems.append(f"{key}: both {' and '.join(exts)}; keep one")
    if any(found) and not all(found):
        stems = " and ".join(member.stem for member in spec.maps)
        problems.append(f"{key}: {stems} members must be present together "
                        f"(found {', '.join(ext for exts in found for ext in exts)})")
        return False
    if not all(len(exts) == 1 for exts in found):
        return False
    checked = [check_aux(exts[0]) for exts in found]  # every member checked, so each problem is reported
    return all(checked)


__all__ = ["encode_sample", "encode_depth_png", "depth_millimetres", "write_shard", "check_sample",
           "sample_key", "known_exts", "modalities_of", "RGB_EXTS", "AUX_FORMATS"]
