"""Reader of the official NYU Depth v2 files, one image at a time (docs/data_format.md).

Used by the shard builder (`rock_dist.shards`) and by tests; training never reads these files directly. Inputs:
`nyu_depth_v2_labeled.mat` (MATLAB v7.3 = HDF5, read with h5py per index, never whole arrays), `splits.mat`
(MATLAB v5, 1-based), the Eigen & Fergus normals as a `normals_gt` folder or the `normals_gt.tgz` archive read in
place, and an optional `val_split.txt` of scene names that move images from train to val.

Per image it derives RGB (H, W, 3) uint8, depth (H, W) metres, unit normals (H, W, 3) + validity mask, the scene
type/name/id, and one inclusive xyxy box per (label, instance) object of the 19 detection classes. Every problem with
the files is a `DataError` naming the file and what is wrong. HDF5 and tar handles are opened lazily per process
(h5py handles are not fork-safe), so a reader can be pickled into worker processes.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import h5py
import numpy as np
import scipy.io
from PIL import Image, UnidentifiedImageError

from rock_dist.data.constants import CLASS_NAMES, NYU_LABEL_IDS, SCENE_TYPES, class_id
from rock_dist.errors import DataError

REQUIRED_KEYS: tuple[str, ...] = ("images", "depths", "labels", "instances", "names", "sceneTypes", "scenes")
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
_PNG_NAME = re.compile(r"^(\d{4,})\.png$")

# Failures of a damaged gzip/tar stream surface as any of these, depending on where the damage is.
TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


@dataclass
class NYUSample:
    """One image of the official dataset with everything derived from it."""

    index: int  # 0-based position in the .mat
    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray | None  # (H, W) float32 metres; None when the image has no valid depth at all
    boxes: np.ndarray  # (K, 4) int64 inclusive pixel xyxy
    labels: np.ndarray  # (K,) int64 class ids 1..19
    scene_type: str | None
    scene_name: str | None
    scene_id: int | None  # 0..26, None when the scene type is empty
    normals: np.ndarray | None = None  # (H, W, 3) float32 unit vectors (decoded from the 8-bit PNG)
    normals_mask: np.ndarray | None = None  # (H, W) bool, True = valid

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


@dataclass(frozen=True)
class NormalPair:
    """The two PNG files of one image's normals, as stored (kept byte-exact for the shards)."""

    normals_png: bytes
    mask_png: bytes
    normals_name: str  # where they came from, for error messages
    mask_name: str


# ------------------------------------------------------------------------------------------------- annotations
def class_lookup_table(nyu_ids: dict[str, int]) -> np.ndarray:
    """A (65536,) int64 table mapping a NYU label id (uint16) to our class id 1..19, 0 for everything else."""
    table = np.zeros(1 << 16, dtype=np.int64)
    for name, nyu in nyu_ids.items():
        table[nyu] = class_id(name)
    return table


def derive_boxes(labels: np.ndarray, instances: np.ndarray, class_table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One box per (label, instance) object of the detection classes.

    labels, instances: (H, W) integer maps. Returns boxes (K, 4) int64 inclusive [x_min, y_min, x_max, y_max] over
    all pixels of the object (disjoint parts give one box) and class ids (K,) int64, ordered by (class, instance).
    Only instance 0 is dropped (the reference also dropped class id i in image i); instance numbers need not be
    contiguous.
    """
    cls = class_table[labels]
    ys, xs = np.nonzero((cls > 0) & (instances > 0))
    if ys.size == 0:
        return np.zeros((0, 4), np.int64), np.zeros((0,), np.int64)
    # One integer key per object; sorting groups each object's pixels so reduceat gives its extent in one pass.
    key = cls[ys, xs] * (1 << 16) + instances[ys, xs].astype(np.int64)
    order = np.argsort(key, kind="stable")
    key, ys, xs = key[order], ys[order], xs[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    boxes = np.stack([np.minimum.reduceat(xs, starts), np.minimum.reduceat(ys, starts),
                      np.maximum.reduceat(xs, starts), np.maximum.reduceat(ys, starts)], axis=1).astype(np.int64)
    return boxes, (key[starts] >> 16).astype(np.int64)


def decode_normals(normals_u8: np.ndarray) -> np.ndarray:
    """8-bit Eigen & Fergus encoding (H, W, 3) -> unit normals (H, W, 3) float32: n = v / 127.5 - 1, renormalised."""
    n = normals_u8.astype(np.float32) / 127.5 - 1.0
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    # A zero vector (possible only where the mask is invalid) stays zero instead of becoming NaN.
    return np.divide(n, norm, out=np.zeros_like(n), where=norm > 1e-6)


def decode_png(data: bytes, name: str, *, mode: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a PNG to an array, checking its mode and (H, W) size; DataError naming `name` otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode != mode:
                if mode == "L" and im.mode in ("1", "P", "I", "I;16"):
                    im = im.convert("L")
                elif mode == "RGB" and im.mode in ("RGBA", "P"):
                    im = im.convert("RGB")
                else:
                    raise DataError(f"{name}: PNG mode {im.mode!r}, expected {mode!r}")
            array = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{name}: not a readable PNG ({err})") from None
    if size is not None and array.shape[:2] != size:
        raise DataError(f"{name}: image is {array.shape[0]}x{array.shape[1]}, expected {size[0]}x{size[1]} "
                        "(the size of the dataset's images)")
    return array


# ------------------------------------------------------------------------------------------------------ splits
def read_splits(path: str | os.PathLike[str], num_images: int) -> dict[str, np.ndarray]:
    """`splits.mat` -> {"train", "test"}: sorted 0-based int64 index arrays, checked for range and overlap."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: splits file not found")
    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError:
        raise DataError(f"{path}: is a MATLAB v7.3 (HDF5) file; splits.mat must be a MATLAB v5 file") from None
    except Exception as err:  # scipy raises assorted types (ValueError, TypeError, MatReadError) on junk
        raise DataError(f"{path}: not a readable MATLAB v5 file ({err})") from err
    out: dict[str, np.ndarray] = {}
    for split, key in (("train", "trainNdxs"), ("test", "testNdxs")):
        if key not in mat:
            found = sorted(k for k in mat if not k.startswith("__"))
            raise DataError(f"{path}: missing variable {key!r} (found {found})")
        raw = np.asarray(mat[key])
        if raw.size == 0 or not np.issubdtype(raw.dtype, np.number):
            raise DataError(f"{path}: {key} is empty or not numeric")
        if raw.ndim > 2 or (raw.ndim == 2 and min(raw.shape) != 1):
            raise DataError(f"{path}: {key} has shape {raw.shape}, expected a column (n, 1)")
        values = raw.astype(np.float64).ravel()
        if not np.all(values == np.round(values)):
            raise DataError(f"{path}: {key} holds non-integer indices")
        idx = values.astype(np.int64)
        bad = idx[(idx < 1) | (idx > num_images)]
        if bad.size:
            raise DataError(f"{path}: {key} index {int(bad[0])} is out of range 1..{num_images} "
                            f"(indices are 1-based; the dataset has {num_images} images)")
        uniq, counts = np.unique(idx, return_counts=True)
        if np.any(counts > 1):
            raise DataError(f"{path}: {key} lists index {int(uniq[counts > 1][0])} more than once")
        out[split] = uniq - 1
    both = np.intersect1d(out["train"], out["test"])
    if both.size:
        raise DataError(f"{path}: {both.size} image(s) are in both trainNdxs and testNdxs (first: 1-based "
                        f"index {int(both[0]) + 1})")
    return out


def read_val_scenes(path: str | os.PathLike[str]) -> list[str]:
    """Scene names of `val_split.txt`, one per line; blank lines and `#` comments ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: val split file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file of scene names") from None
    scenes = [ln.split("#", 1)[0].strip() for ln in lines]
    scenes = [s for s in scenes if s]
    if not scenes:
        raise DataError(f"{path}: lists no scene names")
    return scenes


# ----------------------------------------------------------------------------------------------------- normals
class NormalsSource:
    """The normal maps and masks as a folder (`normals/NNNN.png`, `masks/NNNN.png`) or a tar/tgz read in place.

    Names are 0-based and 4-digit in .mat order. A tgz is never extracted: members are indexed once, and a block of
    images is read in archive order so a compressed stream is decompressed forwards only.
    """

    def __init__(self, path: str | os.PathLike[str], num_images: int) -> None:
        self.path = Path(path)
        self.num_images = num_images
        self._tar: tarfile.TarFile | None = None
        self._tar_pid = -1
        if not self.path.exists():
            raise DataError(f"{self.path}: normals folder or archive not found")
        if self.path.is_dir():
            self.kind = "folder"
            self.root = self._find_root(self.path)
            normals = self._index_names(p.name for p in (self.root / "normals").iterdir())
            masks = self._index_names(p.name for p in (self.root / "masks").iterdir())
            self._check_complete(normals, masks)
            self._members: dict[str, tarfile.TarInfo] = {}
        else:
            self.kind = "archive"
            self.root = self.path
            self._members = self._index_archive()

    @staticmethod
    def _find_root(path: Path) -> Path:
        for candidate in (path, path / "normals_gt"):
            if (candidate / "normals").is_dir() and (candidate / "masks").is_dir():
                return candidate
        raise DataError(f"{path}: expected a folder with normals/ and masks/ subfolders (or normals_gt/ holding them)")

    def _index_names(self, names: Iterable[str]) -> set[int]:
        found: set[int] = set()
        for name in names:
            m = _PNG_NAME.match(name)
            if m:
                found.add(int(m.group(1)))
        return found

    def _check_complete(self, normals: set[int], masks: set[int]) -> None:
        want = set(range(self.num_images))
        for what, have in (("normal maps", normals), ("masks", masks)):
            if have != want:
                missing = sorted(want - have)
                extra = sorted(have - want)
                detail = f"missing {missing[0]:04d}.png" if missing else f"unexpected {extra[0]:04d}.png"
                raise DataError(f"{self.path}: has {len(have)} {what} for {self.num_images} images ({detail}); "
                                "names must be 0-based NNNN.png in .mat order")

    def _open_tar(self) -> tarfile.TarFile:
        if self._tar is None or self._tar_pid != os.getpid():
            try:
                self._tar = tarfile.open(self.path, "r:*")  # noqa: SIM115 - kept open across reads, closed by close()
            except TAR_ERRORS as err:
                raise DataError(f"{self.path}: not a readable tar/tgz archive ({err})") from None
            self._tar_pid = os.getpid()
        return self._tar

    def _index_archive(self) -> dict[str, tarfile.TarInfo]:
        tar = self._open_tar()
        members: dict[str, tarfile.TarInfo] = {}
        normals: set[int] = set()
        masks: set[int] = set()
        try:
            for info in tar.getmembers():
                parts = info.name.split("/")
                if not info.isfile() or len(parts) < 2 or parts[-2] not in ("normals", "masks"):
                    continue
                m = _PNG_NAME.match(parts[-1])
                if not m:
                    continue
                index = int(m.group(1))
                (normals if parts[-2] == "normals" else masks).add(index)
                members[f"{parts[-2]}/{index}"] = info
        except TAR_ERRORS as err:
            raise DataError(f"{self.path}: corrupt or truncated archive ({err})") from None
        self._check_complete(normals, masks)
        return members

    def read(self, indices: Sequence[int]) -> dict[int, NormalPair]:
        """The PNG bytes of the given images' normals and masks."""
        if self.kind == "folder":
            out = {}
            for i in indices:
                pair = []
                for sub in ("normals", "masks"):
                    file = self.root / sub / f"{i:04d}.png"
                    try:
                        pair.append((file.read_bytes(), str(file)))
                    except OSError as err:
                        raise DataError(f"{file}: cannot read ({err.strerror})") from None
                out[i] = NormalPair(pair[0][0], pair[1][0], pair[0][1], pair[1][1])
            return out
        wanted = [self._members[f"{sub}/{i}"] for i in indices for sub in ("normals", "masks")]
        data: dict[str, bytes] = {}
        tar = self._open_tar()
        for info in sorted(wanted, key=lambda m: m.offset_data):
            try:
                handle = tar.extractfile(info)
                blob = handle.read() if handle is not None else b""
            except TAR_ERRORS as err:
                raise DataError(f"{self.path}: corrupt or truncated archive at {info.name} ({err})") from None
            if len(blob) != info.size:
                raise DataError(f"{self.path}: truncated archive ({info.name} is cut short)")
            data[info.name] = blob
        out = {}
        for i in indices:
            n, m = self._members[f"normals/{i}"], self._members[f"masks/{i}"]
            out[i] = NormalPair(data[n.name], data[m.name], f"{self.path}:{n.name}", f"{self.path}:{m.name}")
        return out

    def close(self) -> None:
        if self._tar is not None and self._tar_pid == os.getpid():
            self._tar.close()
        self._tar = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tar"], state["_tar_pid"] = None, -1  # reopened by whichever process reads next
        return state


def decode_normal_pair(pair: NormalPair, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A NormalPair -> (normals uint8 (H, W, 3) as stored, mask bool (H, W)); checks sizes against (H, W)."""
    normals = decode_png(pair.normals_png, pair.normals_name, mode="RGB", size=size)
    mask = decode_png(pair.mask_png, pair.mask_name, mode="L", size=size)
    return normals, mask > 0


# ------------------------------------------------------------------------------------------------------ reader
def _describe_non_hdf5(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(128)
    if head.startswith(b"MATLAB 5.0"):
        return "is a MATLAB v5 file, not the v7.3 (HDF5) nyu_depth_v2_labeled.mat"
    if head.startswith(b"MATLAB 7.3"):
        return "has a MATLAB v7.3 header but no valid HDF5 content (truncated or corrupt download?)"
    return "is not a MATLAB v7.3 (HDF5) file"


class NYUv2Official:
    """The official labeled dataset, its splits and normals, read one image at a time.

    Construction validates everything that can be checked without reading pixels (keys, shapes, dtypes, the class
    vocabulary, scene types, split indices, normals count, val scenes), so a bad input fails before any work.
    """

    def __init__(self, dataset_path: str | os.PathLike[str], splits_path: str | os.PathLike[str] | None = None,
                 normals_path: str | os.PathLike[str] | None = None,
                 val_split_path: str | os.PathLike[str] | None = None) -> None:
        self.dataset_path = Path(dataset_path)
        self.splits_path = Path(splits_path) if splits_path else None
        self.val_split_path = Path(val_split_path) if val_split_path else None
        self._h5: h5py.File | None = None
        self._h5_pid = -1
        if not self.dataset_path.is_file():
            raise DataError(f"{self.dataset_path}: dataset file not found")
        if not h5py.is_hdf5(self.dataset_path):
            raise DataError(f"{self.dataset_path}: {_describe_non_hdf5(self.dataset_path)}")

        h5 = self._file()
        missing = [k for k in REQUIRED_KEYS if k not in h5]
        if missing:
            raise DataError(f"{self.dataset_path}: missing required key(s) {', '.join(missing)}")
        self.num_images, self.height, self.width = self._check_shapes(h5)
        self.nyu_label_ids = self._lookup_names(h5)
        self._class_table = class_lookup_table(self.nyu_label_ids)
        self.scene_types = self._strings(h5, "sceneTypes")
        self.scene_names = self._strings(h5, "scenes")
        for i, t in enumerate(self.scene_types):
            if t and t not in SCENE_TYPES:
                raise DataError(f"{self.dataset_path}: image {i} has unknown scene type {t!r} "
                                "(expected one of the 27 NYUv2 scene types)")

        self.normals = NormalsSource(normals_path, self.num_images) if normals_path else None
        self.splits = self._make_splits()

    # -- process-local handles ----------------------------------------------------------------------------------
    def _file(self) -> h5py.File:
        if self._h5 is None or self._h5_pid != os.getpid():
            # A handle inherited through fork shares HDF5 state with the parent: always open our own.
            try:
                self._h5 = h5py.File(self.dataset_path, "r")
            except OSError as err:
                raise DataError(f"{self.dataset_path}: cannot open as HDF5, truncated or corrupt file? "
                                f"({err})") from None
            self._h5_pid = os.getpid()
        return self._h5

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"], state["_h5_pid"] = None, -1
        return state

    def close(self) -> None:
        if self._h5 is not None and self._h5_pid == os.getpid():
            self._h5.close()
        self._h5 = None
        if self.normals is not None:
            self.normals.close()

    def __enter__(self) -> NYUv2Official:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num_images

    # -- validation ---------------------------------------------------------------------------------------------
    def _check_shapes(self, h5: h5py.File) -> tuple[int, int, int]:
        def fail(key: str, problem: str) -> DataError:
            return DataError(f"{self.dataset_path}: {key} {problem}")

        images = h5["images"]
        if not isinstance(images, h5py.Dataset) or images.ndim != 4 or images.shape[1] != 3:
            raise fail("images", f"has shape {getattr(images, 'shape', None)}, expected (N, 3, W, H) as h5py shows "
                                 "MATLAB's H x W x 3 x N")
        if images.dtype != np.uint8:
            raise fail("images", f"has dtype {images.dtype}, expected uint8")
        n, _, width, height = images.shape
        if n == 0:
            raise fail("images", "holds no images")
        for key in ("depths", "labels", "instances"):
            ds = h5[key]
            if not isinstance(ds, h5py.Dataset) or ds.shape != (n, width, height):
                raise fail(key, f"has shape {getattr(ds, 'shape', None)}, expected {(n, width, height)} to match "
                                f"images {images.shape}")
        if h5["depths"].dtype.kind != "f":
            raise fail("depths", f"has dtype {h5['depths'].dtype}, expected float (metres)")
        for key in ("labels", "instances"):
            if h5[key].dtype.kind not in "ui":
                raise fail(key, f"has dtype {h5[key].dtype}, expected an integer type")
        for key in ("sceneTypes", "scenes"):
            ds = h5[key]
            if not isinstance(ds, h5py.Dataset) or ds.dtype != h5py.ref_dtype or ds.size != n or ds.ndim != 2:
                raise fail(key, f"has shape {getattr(ds, 'shape', None)}, expected (1, {n}) object references")
        names = h5["names"]
        if not isinstance(names, h5py.Dataset) or names.dtype != h5py.ref_dtype or names.ndim != 2:
            raise fail("names", "is not a cell array of object references")
        return n, height, width

    def _string(self, h5: h5py.File, ref: h5py.Reference, where: str) -> str:
        try:
            ds = h5[ref]
            if ds.attrs.get("MATLAB_empty", 0):
                return ""
            codes = np.asarray(ds[()]).ravel()
        except (KeyError, ValueError, OSError) as err:
            raise DataError(f"{self.dataset_path}: {where} is a broken object reference ({err})") from None
        return "".join(map(chr, codes.tolist()))

    def _strings(self, h5: h5py.File, key: str) -> list[str]:
        refs = np.asarray(h5[key][()]).ravel()
        return [self._string(h5, ref, f"{key}[{i}]") for i, ref in enumerate(refs)]

    def _lookup_names(self, h5: h5py.File) -> dict[str, int]:
        """NYU ids of our classes, found by name in `names` (1-based) and checked against the known ids."""
        names = self._strings(h5, "names")
        first: dict[str, int] = {}
        for k, name in enumerate(names, start=1):
            first.setdefault(name, k)
        ids: dict[str, int] = {}
        for name in CLASS_NAMES:
            if name not in first:
                raise DataError(f"{self.dataset_path}: names has no class {name!r} (a different label vocabulary?)")
            if first[name] != NYU_LABEL_IDS[name]:
                raise DataError(f"{self.dataset_path}: names puts {name!r} at id {first[name]}, but NYUv2 has it at "
                                f"{NYU_LABEL_IDS[name]} (a different label vocabulary?)")
            ids[name] = first[name]
        return ids

    def _make_splits(self) -> dict[str, list[int]]:
        if self.splits_path is None:
            return {}
        base = read_splits(self.splits_path, self.num_images)
        train, test = base["train"].tolist(), base["test"].tolist()
        val: list[int] = []
        if self.val_split_path is not None:
            wanted = read_val_scenes(self.val_split_path)
            known = set(self.scene_names)
            unknown = [s for s in wanted if s not in known]
            if unknown:
                raise DataError(f"{self.val_split_path}: scene {unknown[0]!r} is not a scene of "
                                f"{self.dataset_path.name} ({len(unknown)} unknown name(s))")
            moved = set(wanted)
            val = [i for i in train if self.scene_names[i] in moved]
            train = [i for i in train if self.scene_names[i] not in moved]
            if not val:
                raise DataError(f"{self.val_split_path}: none of its scenes has a training image, so val is empty")
        for split, idx in (("train", train), ("test", test)):
            if not idx:
                raise DataError(f"{self.splits_path}: the {split} split is empty")
        return {"train": train, "val": val, "test": test} if val else {"train": train, "test": test}

    # -- per-image reads ----------------------------------------------------------------------------------------
    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} out of range 0..{self.num_images - 1}")

    def read_rgb(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8. h5py shows (3, W, H): transpose, never reshape."""
        self._check_index(index)
        return np.ascontiguousarray(self._read("images", index).transpose(2, 1, 0))

    def read_depth(self, index: int) -> np.ndarray:
        """(H, W) float32 metres (hole-filled)."""
        self._check_index(index)
        return np.ascontiguousarray(self._read("depths", index).T.astype(np.float32, copy=False))

    def read_annotations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (K, 4) int64 inclusive xyxy and class ids (K,) int64 of one image."""
        self._check_index(index)
        labels = self._read("labels", index).T
        instances = self._read("instances", index).T
        if labels.max(initial=0) >= self._class_table.size:
            raise DataError(f"{self.dataset_path}: labels of image {index} exceed the uint16 range")
        return derive_boxes(labels, instances, self._class_table)

    def _read(self, key: str, index: int) -> np.ndarray:
        try:
            return self._file()[key][index]
        except (OSError, RuntimeError) as err:
            raise DataError(f"{self.dataset_path}: cannot read {key}[{index}] (truncated or corrupt file?): "
                            f"{err}") from None

    def read(self, index: int, *, normals: bool = True, pair: NormalPair | None = None) -> NYUSample:
        """Everything about image `index`. Normals are decoded when a normals source is set and `normals` is true
        (`pair` passes PNG bytes already fetched with `self.normals.read`)."""
        rgb = self.read_rgb(index)
        depth = self.read_depth(index)
        if not np.any(np.isfinite(depth) & (depth > 0)):
            depth_or_none: np.ndarray | None = None  # no measurement at all: an absent modality, not zeros
        else:
            depth_or_none = depth
        boxes, labels = self.read_annotations(index)
        scene_type = self.scene_types[index] or None
        sample = NYUSample(index=index, rgb=rgb, depth=depth_or_none, boxes=boxes, labels=labels,
                           scene_type=scene_type, scene_name=self.scene_names[index] or None,
                           scene_id=SCENE_TYPES.index(scene_type) if scene_type else None)
        if normals and self.normals is not None:
            if pair is None:
                pair = self.normals.read([index])[index]
            normals_u8, mask = decode_normal_pair(pair, (self.height, self.width))
            sample.normals = decode_normals(normals_u8)
            sample.normals_mask = mask
        return sample

    def iter_samples(self, indices: Sequence[int], *, normals: bool = True, block: int = 64) -> Iterator[NYUSample]:
        """Samples of `indices` in order; normals are fetched per block (one forward pass through a tgz)."""
        for start in range(0, len(indices), block):
            chunk = list(indices[start:start + block])
            pairs = self.normals.read(chunk) if normals and self.normals is not None else {}
            for i in chunk:
                yield self.read(i, normals=normals, pair=pairs.get(i))


__all__ = ["NYUv2Official", "NYUSample", "NormalPair", "NormalsSource", "derive_boxes", "class_lookup_table",
           "decode_normals", "decode_normal_pair", "decode_png", "read_splits", "read_val_scenes", "REQUIRED_KEYS",
           "SPLIT_NAMES", "TAR_ERRORS"]
