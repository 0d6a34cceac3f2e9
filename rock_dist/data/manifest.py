"""The per-split `manifest.json` of a shard directory (docs/data_format.md): read, validate, write.

Written by the shard builder (`rock_dist.shards`); read by the training/evaluation pipelines to plan epochs without
scanning tars (`shard_paths`, per-shard `num_samples`), by the model builder (class and scene vocabularies) and by
`shards verify`. Also holds the sha256 helpers used to fingerprint source files and shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rock_dist.errors import DataError
from rock_dist.fsutil import atomic_write_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "rock_dist-shards"
BUILDER_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    """One tar file of a split."""

    name: str  # file name inside the split directory, e.g. shard-000000.tar
    num_samples: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """Everything a reader needs to know about one split without opening its shards."""

    split_dir: Path
    dataset: str
    split: str
    num_samples: int
    shards: list[ShardInfo]
    class_names: list[str]
    scene_types: list[str]
    image_ids: list[int]
    modalities: dict[str, int]  # samples per modality (rock_dist.tasks.catalog.modalities: rgb and each task)
    image_size: list[int]  # [H, W] of the stored images
    sources: dict[str, dict[str, Any]]  # file name -> {"sha256", "bytes", "role"}
    created: str
    builder_version: int = BUILDER_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys a newer builder added, kept on rewrite

    @property
    def path(self) -> Path:
        return self.split_dir / MANIFEST_NAME

    def shard_paths(self) -> list[str]:
        """Paths of the split's shards, in manifest order."""
        return [str(self.split_dir / s.name) for s in self.shards]

    def source_fingerprint(self) -> tuple[str, str | None]:
        """(dataset name, sha256 of the source dataset file): what makes two builds 'the same dataset'."""
        digest = next((v.get("sha256") for v in self.sources.values() if v.get("role") == "dataset"), None)
        return self.dataset, digest

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "builder_version": self.builder_version,
            "dataset": self.dataset,
            "split": self.split,
            "num_samples": self.num_samples,
            "shards": [{"name": s.name, "num_samples": s.num_samples, "sha256": s.sha256, "bytes": s.bytes}
                       for s in self.shards],
            "class_names": list(self.class_names),
            "scene_types": list(self.scene_types),
            "image_ids": list(self.image_ids),
            "modalities": dict(self.modalities),
            "image_size": list(self.image_size),
            "sources": self.sources,
            "created": self.created,
            **self.extra,
        }

    def save(self) -> None:
        atomic_write_json(self.path, self.to_dict())
        # The atomic writer's temporary file is private (0600); shards are shared read-only data.
        os.chmod(self.path, 0o644)


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str, "builder_version": int, "dataset": str, "split": str, "num_samples": int, "shards": list,
    "class_names": list, "scene_types": list, "image_ids": list, "modalities": dict, "image_size": list,
    "sources": dict, "created": str,
}


def load_manifest(split_dir: str | os.PathLike[str]) -> Manifest:
    """Read and check `split_dir/manifest.json` (or a manifest file given directly); DataError naming the file."""
    split_dir = Path(split_dir)
    if split_dir.name == MANIFEST_NAME and split_dir.is_file():
        split_dir = split_dir.parent
    path = split_dir / MANIFEST_NAME
    if not path.is_file():
        hint = " (build shards with `python -m rock_dist.shards build`)" if not split_dir.exists() else ""
        raise DataError(f"{path}: shard manifest not found{hint}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable JSON manifest ({err})") from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: not a rock_dist shard manifest (format is not {MANIFEST_FORMAT!r})")
    for key, kind in _REQUIRED.items():
        if key not in raw:
            raise DataError(f"{path}: missing key {key!r}")
        if not isinstance(raw[key], kind) or (kind is int and isinstance(raw[key], bool)):
            raise DataError(f"{path}: {key!r} has the wrong type ({type(raw[key]).__name__})")
    if raw["builder_version"] > BUILDER_VERSION:
        raise DataError(f"{path}: written by a newer shard builder (version {raw['builder_version']} > "
                        f"{BUILDER_VERSION}); update rock_dist")
    shards = []
    for k, s in enumerate(raw["shards"]):
        try:
            info = ShardInfo(name=str(s["name"]), num_samples=int(s["num_samples"]), sha256=str(s["sha256"]),
                             bytes=int(s["bytes"]))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: shard entry {k} needs name, num_samples, sha256 and bytes") from None
        if "/" in info.name or info.name.startswith("."):
            raise DataError(f"{path}: shard name {info.name!r} must be a plain file name in the split directory")
        shards.append(info)
    total = sum(s.num_samples for s in shards)
    if total != raw["num_samples"] or len(raw["image_ids"]) != raw["num_samples"]:
        raise DataError(f"{path}: num_samples {raw['num_samples']} disagrees with the shards ({total}) or "
                        f"image_ids ({len(raw['image_ids'])})")
    return Manifest(
        split_dir=split_dir, dataset=raw["dataset"], split=raw["split"], num_samples=raw["num_samples"],
        shards=shards, class_names=[str(c) for c in raw["class_names"]],
        scene_types=[str(s) for s in raw["scene_types"]], image_ids=[int(i) for i in raw["image_ids"]],
        modalities={str(k): int(v) for k, v in raw["modalities"].items()},
        image_size=[int(v) for v in raw["image_size"]], sources=raw["sources"], created=raw["created"],
        builder_version=raw["builder_version"], extra={k: v for k, v in raw.items() if k not in _REQUIRED})


# --------------------------------------------------------------------------------------------------- checksums
def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file, streamed in 4 MiB chunks (hashlib releases the GIL on them)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def sha256_tree(root: str | os.PathLike[str]) -> tuple[str, int]:
    """A folder's fingerprint: sha256 over the sorted (relative path, file sha256) list, and the total bytes."""
    root = Path(root)
    digest = hashlib.sha256()
    total = 0
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        sha, size = sha256_file(file)
        digest.update(f"{file.relative_to(root).as_posix()}\0{sha}\n".encode())
        total += size
    return digest.hexdigest(), total


def source_entry(path: str | os.PathLike[str], role: str) -> tuple[str, dict[str, Any]]:
    """(name, {"sha256", "bytes", "role"}) of a source file or folder (folders get a trailing '/')."""
    path = Path(path)
    if path.is_dir():
        sha, size = sha256_tree(path)
        return f"{path.name}/", {"sha256": sha, "bytes": size, "role": role}
    sha, size = sha256_file(path)
    return path.name, {"sha256": sha, "bytes": size, "role": role}


__all__ = ["Manifest", "ShardInfo", "load_manifest", "sha256_file", "sha256_tree", "source_entry", "MANIFEST_NAME",
           "MANIFEST_FORMAT", "BUILDER_VERSION"]
