"""Writers of NYU Depth v2 look-alikes in the exact official file layout, for tests and synthetic training sets.

`write_official_layout` turns in-memory arrays into the files the official reader (`rock_dist.shardbuild.nyuv2`) and
the shard builder consume: `nyu_depth_v2_labeled.mat` (MATLAB v7.3 = HDF5 behind a 512-byte MATLAB header, dimensions
reversed as MATLAB stores them, strings as object references into `#refs#`), `splits.mat` (MATLAB v5, 1-based
(n, 1) uint16 indices), the Eigen & Fergus normals as 0-based 4-digit PNGs (a folder or a `.tgz`), and an optional
`val_split.txt`. Nothing third-party is needed or committed: the tests, and the rooms generator
(`rock_dist.synthetic.rooms`), produce their datasets with it.

`make_random_dataset` draws random boxes-on-background images whose annotations are known by construction and writes
them with a `ground_truth.json` sidecar, so tests can compare what the reader and the shards derive against it.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np
import scipy.io
from PIL import Image

from rock_dist.data.constants import CLASS_NAMES, NYU_LABEL_IDS, NYU_NUM_NAMES, SCENE_TYPES, class_id, scene_id
from rock_dist.fsutil import atomic_write_json

DATASET_FILENAME = "nyu_depth_v2_labeled.mat"
SPLITS_FILENAME = "splits.mat"
NORMALS_DIRNAME = "normals_gt"
NORMALS_TGZ_FILENAME = "normals_gt.tgz"
VAL_SPLIT_FILENAME = "val_split.txt"
GROUND_TRUTH_FILENAME = "ground_truth.json"

MAT73_USERBLOCK = 512


@dataclass(frozen=True)
class OfficialPaths:
    """Where `write_official_layout` put each file (the flags of `python -m rock_dist.shards build`)."""

    dataset_path: Path
    splits_path: Path
    normals_path: Path | None  # the normals_gt folder or normals_gt.tgz; None when no normals were written
    val_split_path: Path | None
    ground_truth_path: Path | None


def official_like_names(num_names: int = NYU_NUM_NAMES) -> list[str]:
    """The 894-entry `names` vocabulary with our 19 classes at their official NYU ids and unique fillers elsewhere."""
    names = [f"nyu_object_{k:03d}" for k in range(1, num_names + 1)]
    for name, nyu_id in NYU_LABEL_IDS.items():
        names[nyu_id - 1] = name
    return names


def encode_normals_png(normals: np.ndarray) -> np.ndarray:
    """Unit normals (H, W, 3) float -> the official 8-bit encoding v = (n + 1) * 127.5, rounded."""
    return np.clip(np.rint((normals.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _mat73_header() -> bytes:
    """The 128-byte MATLAB 7.3 preamble (text, subsystem offset, version 0x0200, endian 'IM'), padded to 512."""
    stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(0))
    text = f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {stamp} HDF5 schema 1.00 .".encode("ascii")
    head = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    return head.ljust(MAT73_USERBLOCK, b"\x00")


class _RefWriter:
    """Writes MATLAB char arrays into `#refs#` and hands back object references, as MATLAB does for cell strings."""

    def __init__(self, h5: h5py.File) -> None:
        self._h5 = h5
        self._group = h5.create_group("#refs#")
        self._count = 0

    def _next_name(self) -> str:
        # MATLAB names its hidden datasets a, b, ..., z, ba, bb, ... ; any unique name works for readers.
        k, chars = self._count, ""
        self._count += 1
        while True:
            chars = chr(ord("a") + k % 26) + chars
            k //= 26
            if k == 0:
                return chars

    def string(self, text: str) -> h5py.Reference:
        if text:
            # MATLAB stores a 1xL char row; h5py sees it reversed as (L, 1) uint16 code units.
            data = np.array([ord(c) for c in text], dtype=np.uint16).reshape(-1, 1)
            ds = self._group.create_dataset(self._next_name(), data=data)
            ds.attrs["MATLAB_class"] = np.bytes_("char")
            ds.attrs["MATLAB_int_decode"] = np.int32(2)
        else:
            # An empty MATLAB array is written as its dimensions with MATLAB_empty set.
            ds = self._group.create_dataset(self._next_name(), data=np.zeros(2, dtype=np.uint64))
            ds.attrs["MATLAB_class"] = np.bytes_("char")
            ds.attrs["MATLAB_empty"] = np.uint8(1)
        return ds.ref

    def cell_row(self, key: str, texts: Sequence[str]) -> None:
        refs = self._h5.create_dataset(key, shape=(1, len(texts)), dtype=h5py.ref_dtype)
        refs[0, :] = [self.string(t) for t in texts]
        refs.attrs["MATLAB_class"] = np.bytes_("cell")


def _write_mat73(path: Path, arrays: Mapping[str, np.ndarray], names: Sequence[str], scene_types: Sequence[str],
                 scenes: Sequence[str]) -> None:
    """Write the labeled-dataset .mat: HDF5 with a MATLAB userblock, one chunk per image for per-index reads."""
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w", userblock_size=MAT73_USERBLOCK, libver="earliest") as h5:
        for key, array in arrays.items():
            # MATLAB is column-major, so h5py sees its H x W x 3 x N array reversed: (N, 3, W, H) / (N, W, H).
            stored = np.ascontiguousarray(array.transpose((0,) + tuple(range(array.ndim - 1, 0, -1))))
            ds = h5.create_dataset(key, data=stored, chunks=(1,) + stored.shape[1:])
            ds.attrs["MATLAB_class"] = np.bytes_({np.uint8: "uint8", np.uint16: "uint16",
                                                  np.float32: "single"}[array.dtype.type])
        refs = _RefWriter(h5)
        refs.cell_row("names", names)
        refs.cell_row("sceneTypes", scene_types)
        refs.cell_row("scenes", scenes)
    with open(tmp, "r+b") as handle:
        handle.write(_mat73_header())
    os.replace(tmp, path)


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def allocate_official_arrays(n: int, height: int, width: int) -> tuple[np.ndarray, ...]:
    """Zeroed per-image arrays in the dtypes `write_official_layout` takes, for generators to fill:
    (images N x H x W x 3 uint8, depths f32, raw_depths f32, labels uint16, instances uint8,
    normals N x H x W x 3 f32, normal_masks bool)."""
    return (np.zeros((n, height, width, 3), np.uint8), np.zeros((n, height, width), np.float32),
            np.zeros((n, height, width), np.float32), np.zeros((n, height, width), np.uint16),
            np.zeros((n, height, width), np.uint8), np.zeros((n, height, width, 3), np.float32),
            np.zeros((n, height, width), bool))


def write_official_layout(out_dir: str | os.PathLike[str], *, images: np.ndarray, depths: np.ndarray,
                          raw_depths: np.ndarray, labels: np.ndarray, instances: np.ndarray,
                          scene_types: Sequence[str], scenes: Sequence[str], normals: np.ndarray | None,
                          normal_masks: np.ndarray | None, train_idx: Sequence[int] | np.ndarray,
                          test_idx: Sequence[int] | np.ndarray, val_scenes: Sequence[str] | None,
                          names: Sequence[str] | None = None, normals_as_tgz: bool = False,
                          ground_truth: Mapping[int, Mapping[str, Any]] | None = None) -> OfficialPaths:
    """Write N images in the official NYUv2 file layout under `out_dir` and return the paths.

    images (N, H, W, 3) uint8; depths, raw_depths (N, H, W) float32 metres; labels (N, H, W) uint16 (1-based
    indices into `names`, 0 = unlabeled); instances (N, H, W) uint8; normals (N, H, W, 3) unit vectors and
    normal_masks (N, H, W) bool, or both None to write no normals; train_idx/test_idx 0-based. `val_scenes`
    (scene names) is written as val_split.txt unless None. `ground_truth` (image index -> JSON-able record) is
    written as ground_truth.json when given.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, height, width = labels.shape
    expected = {"images": (n, height, width, 3), "depths": (n, height, width), "raw_depths": (n, height, width),
                "instances": (n, height, width)}
    for key, array in (("images", images), ("depths", depths), ("raw_depths", raw_depths),
                       ("instances", instances)):
        if array.shape != expected[key]:
            raise ValueError(f"{key} has shape {array.shape}, expected {expected[key]}")
    if len(scene_types) != n or len(scenes) != n:
        raise ValueError(f"scene_types and scenes need {n} entries")
    if (normals is None) != (normal_masks is None):
        raise ValueError("give both normals and normal_masks, or neither")
    names = list(official_like_names() if names is None else names)

    dataset_path = out / DATASET_FILENAME
    _write_mat73(dataset_path, {
        "images": images.astype(np.uint8, copy=False),
        "depths": depths.astype(np.float32, copy=False),
        "rawDepths": raw_depths.astype(np.float32, copy=False),
        "labels": labels.astype(np.uint16, copy=False),
        "instances": instances.astype(np.uint8, copy=False),
    }, names, scene_types, scenes)

    splits_path = out / SPLITS_FILENAME
    # The official file holds 1-based (n, 1) columns; scipy reads them back as uint16.
    scipy.io.savemat(splits_path, {
        "trainNdxs": (np.asarray(train_idx, dtype=np.int64) + 1).astype(np.uint16).reshape(-1, 1),
        "testNdxs": (np.asarray(test_idx, dtype=np.int64) + 1).astype(np.uint16).reshape(-1, 1),
    }, format="5")

    normals_path: Path | None = None
    if normals is not None and normal_masks is not None:
        if normals.shape != (n, height, width, 3) or normal_masks.shape != (n, height, width):
            raise ValueError("normals must be (N, H, W, 3) and normal_masks (N, H, W)")
        members = []
        for kind in ("normals", "masks"):  # all normals first, then all masks, as the archive is laid out
            for i in range(n):
                array = encode_normals_png(normals[i]) if kind == "normals" else \
                    np.where(normal_masks[i], 255, 0).astype(np.uint8)
                members.append((f"{NORMALS_DIRNAME}/{kind}/{i:04d}.png", _png_bytes(array)))
        if normals_as_tgz:
            normals_path = out / NORMALS_TGZ_FILENAME
            with tarfile.open(normals_path, "w:gz") as tar:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(data))
        else:
            normals_path = out / NORMALS_DIRNAME
            for sub in ("normals", "masks"):
                (normals_path / sub).mkdir(parents=True, exist_ok=True)
            for name, data in members:
                (out / name).write_bytes(data)

    val_split_path: Path | None = None
    if val_scenes is not None:
        val_split_path = out / VAL_SPLIT_FILENAME
        val_split_path.write_text("".join(f"{s}\n" for s in val_scenes))

    ground_truth_path: Path | None = None
    if ground_truth is not None:
        ground_truth_path = out / GROUND_TRUTH_FILENAME
        atomic_write_json(ground_truth_path, {str(k): v for k, v in sorted(ground_truth.items())})

    return OfficialPaths(dataset_path=dataset_path, splits_path=splits_path, normals_path=normals_path,
                         val_split_path=val_split_path, ground_truth_path=ground_truth_path)


def load_ground_truth(path: str | os.PathLike[str]) -> dict[int, dict[str, Any]]:
    """Read a ground_truth.json sidecar back as {image index: record}."""
    return {int(k): v for k, v in json.loads(Path(path).read_text()).items()}


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    v[2] = -abs(v[2]) - 0.3  # surfaces face the camera (z along the optical axis points away from it)
    return v / np.linalg.norm(v)


def make_random_dataset(out_dir: str | os.PathLike[str], n: int, seed: int, height: int = 48, width: int = 64, *,
                        with_val: bool = True, with_normals: bool = True, normals_as_tgz: bool = False,
                        missing_scene: Sequence[int] = (), max_objects: int = 4) -> OfficialPaths:
    """A random NYUv2 look-alike of `n` images with known boxes, classes, scenes and splits.

    Objects are axis-aligned rectangles placed in separate grid cells, so no object hides another and every box
    is known exactly. The generator deliberately includes what broke the reference preparation: image i (1..19)
    contains class id i and, where i is a NYU id of one of our classes, that class too; instance numbers have gaps;
    some objects come in two disjoint parts (one box over both); some target-class pixels have instance 0 (no box);
    other NYU labels are clutter (no box). Images listed in `missing_scene` get an empty scene type (the shard then
    has no scene member). With `with_val`, some training scenes are listed in val_split.txt.
    """
    if n < 4:
        raise ValueError("make_random_dataset needs n >= 4 (train and test scenes)")
    rng = np.random.default_rng(seed)
    rows, cols = 3, 4
    if height < rows * 6 or width < cols * 6:
        raise ValueError(f"image size {height}x{width} too small for the {rows}x{cols} object grid")
    ch, cw = height // rows, width // cols
    target_ids = set(NYU_LABEL_IDS.values())
    clutter_ids = [k for k in range(1, NYU_NUM_NAMES + 1) if k not in target_ids]

    images, depths, raw_depths, labels, instances, normals, masks = allocate_official_arrays(n, height, width)
    masks[:] = True

    # Scenes: consecutive frames share a scene, as in the recorded sequences.
    num_scenes = max(4, n // 3)
    scene_type_of = [SCENE_TYPES[int(k)] for k in rng.integers(0, len(SCENE_TYPES), num_scenes)]
    scene_names = [f"{t}_{k + 1:04d}" for k, t in enumerate(scene_type_of)]
    scene_of_image = [i * num_scenes // n for i in range(n)]
    missing = set(int(i) for i in missing_scene)
    scene_types = ["" if i in missing else scene_type_of[scene_of_image[i]] for i in range(n)]
    scenes = [scene_names[scene_of_image[i]] for i in range(n)]

    def paint(i: int, rect: tuple[int, int, int, int], nyu: int, inst: int) -> None:
        """An object part on image i: its label and instance, a flat colour, closer depth, one normal."""
        x0, y0, x1, y1 = rect
        labels[i, y0:y1 + 1, x0:x1 + 1] = nyu
        instances[i, y0:y1 + 1, x0:x1 + 1] = inst
        images[i, y0:y1 + 1, x0:x1 + 1] = rng.integers(0, 256, 3)
        depths[i, y0:y1 + 1, x0:x1 + 1] -= 0.3
        normals[i, y0:y1 + 1, x0:x1 + 1] = _random_unit(rng)

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    truth: dict[int, dict[str, Any]] = {}
    for i in range(n):
        base = rng.integers(40, 216, 3)
        images[i] = np.clip(base + rng.integers(-12, 13, (height, width, 3)), 0, 255).astype(np.uint8)
        plane = rng.uniform(1.5, 6.0) + rng.uniform(-0.02, 0.02) * yy + rng.uniform(-0.02, 0.02) * xx
        depths[i] = np.clip(plane, 0.7, 10.0)
        normals[i] = _random_unit(rng)
        # Clutter: a band of some non-target NYU label (wall, floor, ...) that must produce no box.
        band = int(rng.integers(1, max(2, height // 6)))
        labels[i, :band] = clutter_ids[int(rng.integers(len(clutter_ids)))]

        forced = []
        if 1 <= i <= len(CLASS_NAMES):
            forced.append(CLASS_NAMES[i - 1])
        forced += [name for name, nyu in NYU_LABEL_IDS.items() if nyu == i and name not in forced]
        k = int(rng.integers(1, max_objects + 1))
        chosen = forced + [CLASS_NAMES[int(c)] for c in rng.integers(0, len(CLASS_NAMES), max(0, k - len(forced)))]
        cells = [int(c) for c in rng.permutation(rows * cols)]
        next_instance: dict[str, int] = {}
        boxes, box_labels = [], []

        def rect_in(cell: int) -> tuple[int, int, int, int]:
            r, c = divmod(cell, cols)
            x0 = c * cw + int(rng.integers(0, cw // 3))
            y0 = r * ch + int(rng.integers(0, ch // 3))
            x1 = min(c * cw + cw - 1, x0 + 2 + int(rng.integers(0, cw // 2)))
            y1 = min(r * ch + ch - 1, y0 + 2 + int(rng.integers(0, ch // 2)))
            return x0, y0, x1, y1

        for name in chosen:
            if len(cells) < 1:
                break
            # Gaps in instance numbering (1, 3, 4, 6, ...) broke the reference; keep them common here.
            inst = next_instance.get(name, 0) + int(rng.integers(1, 3))
            next_instance[name] = inst
            parts = [rect_in(cells.pop())]
            if cells and rng.random() < 0.3:
                parts.append(rect_in(cells.pop()))  # a second, disjoint part of the same object
            for rect in parts:
                paint(i, rect, NYU_LABEL_IDS[name], inst)
            boxes.append([min(p[0] for p in parts), min(p[1] for p in parts),
                          max(p[2] for p in parts), max(p[3] for p in parts)])
            box_labels.append(class_id(name))
        if cells and rng.random() < 0.5:
            # A target-class region without an instance number: labelled, but not an object (no box).
            paint(i, rect_in(cells.pop()), NYU_LABEL_IDS[CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]], 0)

        masks[i, :, : max(1, width // 10)] = False  # an invalid border strip, as in the real normal maps
        raw = depths[i].copy()
        raw[rng.random((height, width)) < 0.05] = 0.0  # missing Kinect readings
        raw_depths[i] = raw
        truth[i] = {"boxes": boxes, "labels": box_labels,
                    "scene_id": None if i in missing else scene_id(scene_types[i]),
                    "scene_type": scene_types[i] or None, "scene_name": scenes[i]}

    # Split by scene, as the official split does; val takes whole training scenes.
    order = [int(s) for s in rng.permutation(num_scenes)]
    num_train = max(2, (num_scenes * 3) // 5)
    train_scenes, test_scenes = set(order[:num_train]), set(order[num_train:])
    val_scene_ids = set(sorted(train_scenes)[: max(1, len(train_scenes) // 4)]) if with_val else set()
    train_idx = [i for i in range(n) if scene_of_image[i] in train_scenes]
    test_idx = [i for i in range(n) if scene_of_image[i] in test_scenes]
    for i in range(n):
        s = scene_of_image[i]
        truth[i]["split"] = "test" if s in test_scenes else ("val" if s in val_scene_ids else "train")

    depths = np.clip(depths, 0.5, 10.0)
    norm = np.linalg.norm(normals, axis=-1, keepdims=True)
    normals = normals / norm
    return write_official_layout(
        out_dir, images=images, depths=depths, raw_depths=raw_depths, labels=labels, instances=instances,
        scene_types=scene_types, scenes=scenes, normals=normals if with_normals else None,
        normal_masks=masks if with_normals else None, train_idx=train_idx, test_idx=test_idx,
        val_scenes=[scene_names[s] for s in sorted(val_scene_ids)] if with_val else None,
        normals_as_tgz=normals_as_tgz, ground_truth=truth)


__all__ = ["OfficialPaths", "write_official_layout", "allocate_official_arrays", "make_random_dataset",
           "load_ground_truth",
           "official_like_names", "encode_normals_png", "DATASET_FILENAME", "SPLITS_FILENAME",
           "NORMALS_DIRNAME", "NORMALS_TGZ_FILENAME", "VAL_SPLIT_FILENAME", "GROUND_TRUTH_FILENAME"]
