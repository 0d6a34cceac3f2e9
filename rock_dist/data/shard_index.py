"""Random access into WebDataset shards: a per-split index of each sample's byte span, and reads by seek.

Written by the shard builder (`rock_dist.shards build`, next to `manifest.json` as `index.json`), checked by
`shards verify`, and read by the indexed training loader (`rock_dist.data.pipeline`) so that an epoch can be any
permutation of the split's samples (docs/data_pipeline.md). A shard directory built before the index existed is
indexed on first use (a header scan plus one sequential read for the checksums); the result is saved beside the
manifest when that directory is writable, otherwise in `$ROCK_DIST_CACHE_DIR/shard_index/`, and a message says
where. Nothing else in the shard directory is touched.

One sample's members are consecutive in the tar (that is how WebDataset groups them), so a sample is one byte span
[start, end) from its first member's header to the end of its last member's padded data. The index also records
each span's CRC-32, and a read checks it and every header in the span (checksum, key, size): a shard damaged after
it was built (a flipped byte, a partial copy, a file replaced) is a DataError naming the shard and the sample on
the first read of that sample, never silently wrong data. CRC-32 runs at several GB/s, so checking every read
costs nothing next to decoding, which is why it replaces a whole-file sha256 that random access could not stream.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence

from rock_dist.data.sources import Shard, sample_member
from rock_dist.errors import DataError
from rock_dist.fsutil import atomic_write_json

INDEX_NAME = "index.json"
INDEX_FORMAT = "rock_dist-shard-index"
INDEX_VERSION = 2  # 2: per-sample CRC-32
_BLOCK = 512


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample of one tar file lies: keys[i] spans bytes spans[i] = (start, end)."""

    name: str
    num_bytes: int
    keys: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    crcs: tuple[int, ...]  # zlib.crc32 of each span's bytes

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.num_bytes, "keys": list(self.keys),
                "spans": [list(s) for s in self.spans], "crc32": list(self.crcs)}


class IndexUnsupported(DataError):
    """The tar uses features the seek reader does not follow (pax or GNU long-name headers)."""


def scan_shard(path: str | os.PathLike[str]) -> ShardIndex:
    """Index one local tar (headers, then one pass over the data for the checksums); DataError naming the file
    when it is not a readable tar."""
    path = str(path)
    keys: list[str] = []
    spans: list[list[int]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                parts = sample_member(member)
                if parts is None:
                    continue
                if member.offset_data - member.offset != _BLOCK:
                    raise IndexUnsupported(f"shard {path}: member {member.name} uses extended tar headers; the "
                                           "indexed loader reads plain ustar shards (rebuild with rock_dist, or "
                                           "train with --data_mode stream)")
                end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                if keys and keys[-1] == parts[0]:
                    if spans[-1][1] != member.offset:
                        raise IndexUnsupported(f"shard {path}: the members of sample {parts[0]!r} are not "
                                               "consecutive; use --data_mode stream")
                    spans[-1][1] = end
                else:
                    keys.append(parts[0])
                    spans.append([member.offset, end])
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"shard {path}: not a readable tar file ({err}); rebuild or re-download it") from err
    if len(set(keys)) != len(keys):
        raise DataError(f"shard {path}: a sample key appears in two places")
    crcs = []
    with open(path, "rb") as handle:
        for start, end in spans:
            handle.seek(start)
            crcs.append(zlib.crc32(handle.read(end - start)))
    return ShardIndex(os.path.basename(path), os.path.getsize(path), tuple(keys),
                      tuple((s, e) for s, e in spans), tuple(crcs))


# ------------------------------------------------------------------------------------------------- index files
def cache_index_path(split_dir: str | os.PathLike[str]) -> Path:
    """Where the index of a read-only split directory is kept: one file per absolute directory path."""
    import hashlib

    root = os.environ.get("ROCK_DIST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rock_dist")
    digest = hashlib.sha256(str(Path(split_dir).resolve()).encode()).hexdigest()[:16]
    return Path(root) / "shard_index" / f"{Path(split_dir).name}-{digest}.json"


def write_index(path: str | os.PathLike[str], shards: Sequence[ShardIndex]) -> None:
    atomic_write_json(path, {"format": INDEX_FORMAT, "version": INDEX_VERSION,
                             "shards": [s.to_dict() for s in shards]})
    os.chmod(path, 0o644)  # shared read-only data, like the manifest


def read_index(path: Path) -> dict[str, ShardIndex] | None:
    """The shards of an index file by name; None when it is missing, unreadable or of another format."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != INDEX_FORMAT or raw.get("version") != INDEX_VERSION:
            return None
        return {s["name"]: ShardIndex(str(s["name"]), int(s["bytes"]), tuple(str(k) for k in s["keys"]),
                                      tuple((int(a), int(b)) for a, b in s["spans"]),
                                      tuple(int(c) for c in s["crc32"])) for s in raw["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _fits(entry: ShardIndex | None, shard: Shard) -> bool:
    """An index entry describes this file: same size (the manifest's and the file's) and sample count."""
    if entry is None or shard.num_samples is None or len(entry.keys) != shard.num_samples:
        return False
    size = os.path.getsize(shard.url) if os.path.isfile(shard.url) else -1
    return entry.num_bytes == size and (shard.num_bytes is None or shard.num_bytes == size)


def _say(message: str) -> None:
    # Every rank builds the same index; one of them says so.
    if os.environ.get("RANK", "0") == "0":
        print(f"rock_dist: {message}", file=sys.stderr, flush=True)


def load_or_build_index(shards: Sequence[Shard]) -> list[ShardIndex]:
    """Indexes of local shards (in order), from the split's index.json or its cache, built and saved if missing.

    Raises DataError for a shard that cannot be read, IndexUnsupported for one the seek reader cannot follow.
    """
    by_dir: dict[str, list[int]] = {}
    for k, shard in enumerate(shards):
        by_dir.setdefault(os.path.dirname(os.path.abspath(shard.url)), []).append(k)
    out: list[ShardIndex | None] = [None] * len(shards)
    for directory, members in by_dir.items():
        local, cached = Path(directory) / INDEX_NAME, cache_index_path(directory)
        known = {**(read_index(cached) or {}), **(read_index(local) or {})}
        missing = []
        for k in members:
            entry = known.get(os.path.basename(shards[k].url))
            if _fits(entry, shards[k]):
                out[k] = entry
            else:
                missing.append(k)
        if not missing:
            continue
        for k in missing:
            entry = scan_shard(shards[k].url)
            if not _fits(entry, shards[k]):
                raise DataError(f"shard {shards[k].url}: {len(entry.keys)} samples / {entry.num_bytes} bytes, but "
                                f"its manifest says {shards[k].num_samples} / {shards[k].num_bytes}; the file is "
                                "truncated or was replaced — rebuild or re-download it")
            known[entry.name] = entry
            out[k] = entry
        everything = sorted(known.values(), key=lambda s: s.name)
        try:
            write_index(local, everything)
            where = local
        except OSError:
            write_index(cached, everything)
            where = cached
        _say(f"indexed {len(missing)} shard(s) of {directory} for random access (once; saved to {where})")
    return [entry for entry in out if entry is not None]


# ------------------------------------------------------------------------------------------------------ reading
def read_span(handle: IO[bytes], shard_url: str, key: str, span: tuple[int, int], crc: int) -> dict[str, Any]:
    """The raw sample {suffix: bytes, '__key__', '__url__'} stored at `span` of an open shard file."""
    start, end = span
    handle.seek(start)
    data = handle.read(end - start)
    if len(data) != end - start:
        raise DataError(f"shard {shard_url}: sample {key!r} ends at byte {end} but the file is shorter; the file is "
                        "truncated — rebuild or re-download it")
    if zlib.crc32(data) != crc:
        raise DataError(f"shard {shard_url}: sample {key!r} (bytes {start}-{end}) fails its checksum: the file was "
                        f"damaged or changed after it was built — rebuild it (or delete {INDEX_NAME} if the shard "
                        "was rebuilt on purpose)")
    sample: dict[str, Any] = {"__key__": key, "__url__": shard_url}
    pos = 0
    while pos < len(data):
        try:
            info = tarfile.TarInfo.frombuf(data[pos:pos + _BLOCK], "utf-8", "surrogateescape")
        except tarfile.HeaderError as err:
            raise DataError(f"shard {shard_url}: bad tar header at byte {start + pos} ({err}); the file changed "
                            "since it was indexed or is corrupt — rebuild it") from err
        parts = sample_member(info)
        if parts is None or parts[0] != key:
            raise DataError(f"shard {shard_url}: expected a member of sample {key!r} at byte {start + pos}, found "
                            f"{info.name!r}; the index does not match the file — delete {INDEX_NAME} to rebuild it")
        body = pos + _BLOCK
        if body + info.size > len(data):
            raise DataError(f"shard {shard_url}: member {info.name} overruns its indexed span; delete "
                            f"{INDEX_NAME} to rebuild the index")
        if parts[1] in sample:
            raise DataError(f"shard {shard_url}: member {info.name} appears twice in sample {key!r}")
        sample[parts[1]] = data[body:body + info.size]
        pos = body + -(-info.size // _BLOCK) * _BLOCK
    return sample


class ShardReader:
    """Open shard files of one worker (kept open, at most `max_open` at a time) and read samples by span."""

    def __init__(self, max_open: int = 64) -> None:
        self.max_open = max_open
        self._handles: dict[str, IO[bytes]] = {}

    def read(self, url: str, key: str, span: tuple[int, int], crc: int) -> dict[str, Any]:
        handle = self._handles.pop(url, None)
        if handle is None:
            if len(self._handles) >= self.max_open:
                oldest = next(iter(self._handles))
                self._handles.pop(oldest).close()
            try:
                handle = open(url, "rb", buffering=0)  # noqa: SIM115 - kept open across reads
            except OSError as err:
                raise DataError(f"shard {url}: cannot open ({err})") from err
        self._handles[url] = handle  # most recently used last
        return read_span(handle, url, key, span, crc)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


__all__ = ["INDEX_NAME", "ShardIndex", "IndexUnsupported", "scan_shard", "write_index", "load_or_build_index",
           "cache_index_path", "read_index", "read_span", "ShardReader"]
