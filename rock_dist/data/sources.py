"""Where training/evaluation shards come from: source strings, manifests, shard lists and raw tar reading.

Called by `rock_dist.data.pipeline` (epoch planning in the main process, tar reading inside loader workers) and by
the data benchmark. A source string is one or more comma-separated ``SRC[:WEIGHT]`` items, each SRC being

- a split directory holding ``manifest.json`` and its shards (the normal case, docs/data_format.md), or a manifest file;
- a brace pattern of local tar files (``shards/nyuv2/train/shard-{000000..000007}.tar``); sample counts come from
  the ``manifest.json`` next to them, or from a header scan of the tars when there is none;
- remote shards: ``pipe:`` commands (``pipe:aws s3 cp s3://b/nyuv2/train/shard-{000000..000007}.tar -``) or
  http(s) URLs. Their manifest is fetched the same way with the tar name replaced by ``manifest.json``, so the
  epoch plan (equal steps on every rank, docs/data_pipeline.md) never needs to scan remote tars.

Commas inside braces belong to the pattern; a trailing ``:NUMBER`` is a mixing weight. Either every item has a
weight or none has (then sources are mixed in proportion to their sizes, i.e. like a concatenation).

Reading verifies each shard against its manifest: the number of samples and the number of bytes must match, so a
truncated or corrupt tar raises a DataError naming the shard instead of silently yielding fewer samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

import braceexpand

from rock_dist.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME, load_manifest
from rock_dist.errors import ConfigError, DataError

_WEIGHT_RE = re.compile(r"^(?P<src>.+?):(?P<w>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")
_REMOTE_RE = re.compile(r"^(pipe:|https?://|s3://|gs://)")
# The last path-like token ending in .tar (braces allowed) inside a pipe command or URL.
_TAR_TOKEN_RE = re.compile(r"[^\s'\"]*\.tar(?=$|[\s'\"])")


def is_remote(url: str) -> bool:
    """A `pipe:` command or a URL: read as a stream, never by seeking."""
    return _REMOTE_RE.match(url) is not None


# ------------------------------------------------------------------------------------------------- descriptions
@dataclass(frozen=True)
class Shard:
    """One tar file: where to read it and, when known, how many samples and bytes it must hold."""

    url: str
    num_samples: int | None = None
    num_bytes: int | None = None
    sha256: str | None = None  # from the manifest; checked while a shard is streamed (indexed reads use CRCs)

    @property
    def name(self) -> str:
        return os.path.basename(self.url.rstrip(" -").split()[-1]) if self.url.startswith("pipe:") \
            else os.path.basename(self.url)


@dataclass
class Source:
    """One item of a source string: its shards (in a fixed order) and its mixing weight (None: unspecified)."""

    spec: str
    shards: list[Shard]
    weight: float | None = None
    manifest: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        counts = [s.num_samples for s in self.shards if s.num_samples is not None]
        if len(counts) < len(self.shards):
            raise DataError(f"source {self.spec!r}: sample counts unknown (no manifest)")
        return int(sum(counts))

    @property
    def counts_known(self) -> bool:
        return all(s.num_samples is not None for s in self.shards)


# ------------------------------------------------------------------------------------------------------ parsing
def split_source_list(spec: str) -> list[tuple[str, float | None]]:
    """Split ``SRC[:WEIGHT],SRC[:WEIGHT]`` at top-level commas (not inside braces); parse the weights."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    out: list[tuple[str, float | None]] = []
    for item in (i.strip() for i in items):
        if not item:
            raise ConfigError(f"source list {spec!r}: empty item (stray comma?)")
        m = _WEIGHT_RE.match(item)
        if m:
            weight = float(m.group("w"))
            if not weight > 0:
                raise ConfigError(f"source {m.group('src')!r}: weight must be positive, got {weight}")
            out.append((m.group("src"), weight))
        else:
            out.append((item, None))
    given = [w is not None for _, w in out]
    if any(given) and not all(given):
        raise ConfigError(f"source list {spec!r}: give a weight to every source or to none "
                          "(without weights sources are mixed in proportion to their sizes)")
    return out


# ---------------------------------------------------------------------------------------------------- manifests
def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a local shard manifest (a split directory or the manifest file) → its JSON dict.

    Validation is `rock_dist.data.manifest.load_manifest` (the shard builder's), so errors read the same everywhere.
    """
    return load_manifest(path).to_dict()


def _check_manifest_dict(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{where}: not a rock_dist shard manifest (format {MANIFEST_FORMAT!r} expected)")
    shards = data.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{where}: manifest lists no shards")
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("num_samples"), int):
            raise DataError(f"{where}: shard entry {i} needs 'name' (str) and 'num_samples' (int)")
    total = sum(s["num_samples"] for s in shards)
    if data.get("num_samples", total) != total:
        raise DataError(f"{where}: num_samples {data.get('num_samples')} differs from the sum over shards {total}")
    return data


def _fetch_remote_manifest(pattern: str) -> dict[str, Any]:
    """Fetch the manifest of a remote source by replacing its tar name with manifest.json in the command/URL."""
    tokens = list(_TAR_TOKEN_RE.finditer(pattern))
    if not tokens:
        raise DataError(f"source {pattern!r}: cannot find a '.tar' name to locate its manifest.json")
    tok = tokens[-1]
    directory = tok.group(0).rsplit("/", 1)[0] if "/" in tok.group(0) else ""
    replacement = f"{directory}/{MANIFEST_NAME}" if directory else MANIFEST_NAME
    url = pattern[:tok.start()] + replacement + pattern[tok.end():]
    import webdataset as wds  # heavy import only for remote sources

    try:
        stream = wds.gopen(url)
        try:
            text = stream.read()
        finally:
            stream.close()
        data = json.loads(text)
    except Exception as err:  # any failure of an external command is the user's to fix
        raise DataError(f"source {pattern!r}: cannot read its manifest with {url!r} ({err}); the loader plans epochs "
                        f"from manifests: keep {MANIFEST_NAME} next to the shards") from err
    return _check_manifest_dict(data, url)


# ------------------------------------------------------------------------------------------------------ sources
def _shard_entry(url: str, entry: dict[str, Any]) -> Shard:
    """A Shard from its manifest entry (counts, size and checksum where the manifest has them)."""
    return Shard(url, int(entry["num_samples"]), int(entry["bytes"]) if isinstance(entry.get("bytes"), int) else None,
                 entry["sha256"] if isinstance(entry.get("sha256"), str) else None)


def _shards_from_manifest(data: dict[str, Any], base: str) -> list[Shard]:
    return [_shard_entry(f"{base}/{s['name']}", s) for s in data["shards"]]


def resolve_source(spec: str, weight: float | None = None, *, scan_unknown: bool = True) -> Source:
    """Turn one SRC into a `Source` with its shard list and counts (see the module docstring)."""
    if _REMOTE_RE.match(spec):
        urls = list(braceexpand.braceexpand(spec))
        data = _fetch_remote_manifest(spec)
        by_name = {s["name"]: s for s in data["shards"]}
        shards = []
        for url in urls:
            names = [m.group(0).rsplit("/", 1)[-1] for m in _TAR_TOKEN_RE.finditer(url)]
            entry = by_name.get(names[-1]) if names else None
            if entry is None:
                raise DataError(f"source {spec!r}: shard {names[-1] if names else url!r} is not in its manifest")
            shards.append(_shard_entry(url, entry))
        return Source(spec, shards, weight, manifest="remote", meta=data)

    path = Path(spec)
    if path.is_dir() or path.name == MANIFEST_NAME:
        data = read_manifest(path)
        base = str(path if path.is_dir() else path.parent)
        shards = _shards_from_manifest(data, base)
        missing = [s.url for s in shards if not os.path.isfile(s.url)]
        if missing:
            raise DataError(f"{base}: {len(missing)} shard(s) listed in {MANIFEST_NAME} are missing, e.g. "
                            f"{missing[0]}; rebuild with `python -m rock_dist.shards build`")
        return Source(spec, shards, weight, manifest=str(Path(base) / MANIFEST_NAME), meta=data)

    urls = list(braceexpand.braceexpand(spec))
    if len(urls) == 1 and not path.exists():
        raise DataError(f"source {spec!r} does not exist: expected a split directory with {MANIFEST_NAME} (e.g. "
                        "shards/nyuv2/train), a tar file, a brace pattern of tar files or a 'pipe:' command")
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        hint = "" if path.parent.exists() else f" (directory {path.parent} does not exist)"
        raise DataError(f"source {spec!r}: {len(missing)} of {len(urls)} file(s) not found, e.g. {missing[0]}{hint}")
    directories = {os.path.dirname(os.path.abspath(u)) for u in urls}
    manifests = {d: read_manifest(d) for d in directories if os.path.isfile(os.path.join(d, MANIFEST_NAME))}
    shards = []
    for u in urls:
        d = os.path.dirname(os.path.abspath(u))
        if d in manifests:
            entry = next((s for s in manifests[d]["shards"] if s["name"] == os.path.basename(u)), None)
            if entry is None:
                raise DataError(f"{u}: not listed in {os.path.join(d, MANIFEST_NAME)}")
            shards.append(_shard_entry(u, entry))
        elif scan_unknown:
            shards.append(Shard(u, count_tar_samples(u), os.path.getsize(u)))
        else:
            shards.append(Shard(u))
    meta = next(iter(manifests.values()), {})
    return Source(spec, shards, weight, manifest=None, meta=meta)


def load_sources(spec: str) -> list[Source]:
    """Parse and resolve a whole source string; weights are None when none was given."""
    if not spec or not spec.strip():
        raise ConfigError("empty shard source: pass a split directory such as shards/nyuv2/train")
    return [resolve_source(src, weight) for src, weight in split_source_list(spec)]


# -------------------------------------------------------------------------------------------------- tar reading
def sample_key(member_name: str) -> tuple[str, str] | None:
    """WebDataset naming: key = path up to the first dot of the file name, suffix = the rest (lower case)."""
    directory, _, base = member_name.rpartition("/")
    if "." not in base:
        return None
    stem, _, suffix = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), suffix.lower()


def sample_member(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, suffix) of a tar member that belongs to a sample; None for directories, links, names without a
    suffix and WebDataset's `__`-prefixed metadata members."""
    if not member.isreg():
        return None
    parts = sample_key(member.name)
    if parts is None or parts[0].rpartition("/")[2].startswith("__"):
        return None
    return parts


def count_tar_samples(path: str) -> int:
    """Number of samples in a local tar, reading headers only (tarfile seeks over the member data)."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            keys = {k[0] for m in tar if m.isreg() and (k := sample_key(m.name)) is not None}
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"shard {path}: not a readable tar file ({err})") from err
    return len(keys)


class _CountingReader:
    """File wrapper that counts and hashes the bytes handed to tarfile (to compare with the manifest's shard size
    and sha256 once the shard has been read to its end)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.count = 0
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.count += len(data)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _open(url: str) -> IO[bytes]:
    if _REMOTE_RE.match(url):
        import webdataset as wds  # heavy import only for remote sources

        return wds.gopen(url)
    return open(url, "rb", buffering=1 << 20)


def iter_shard(shard: Shard) -> Iterator[dict[str, Any]]:
    """Yield the raw samples of one shard as dicts {suffix: bytes, '__key__', '__url__'} (nothing decoded).

    Raises DataError naming the shard when it cannot be opened, is not a valid tar, or holds a different number of
    samples or bytes than its manifest says (truncated downloads end cleanly at a member boundary for tarfile).
    """
    count = 0
    try:
        raw = _open(shard.url)
    except Exception as err:  # whatever the opener raises (OSError, a pipe command's error)
        raise DataError(f"shard {shard.url}: cannot open ({err})") from err
    reader = _CountingReader(raw)
    current: dict[str, Any] | None = None
    completed = False
    try:
        try:
            # Stream mode ("r|") only calls read(); typeshed's fileobj protocol also asks for write, seek and tell.
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    parts = sample_member(member)
                    if parts is None:
                        continue
                    key, suffix = parts
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else b""
                    if len(data) != member.size:
                        raise DataError(f"shard {shard.url}: member {member.name} is truncated "
                                        f"({len(data)} of {member.size} bytes)")
                    tar.members = []  # stream mode keeps every TarInfo otherwise
                    if current is None or current["__key__"] != key:
                        if current is not None:
                            count += 1
                            yield current
                        current = {"__key__": key, "__url__": shard.url}
                    if suffix in current:
                        raise DataError(f"shard {shard.url}: member {member.name} appears twice in sample {key!r}")
                    current[suffix] = data
                reader.drain()
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as err:
            raise DataError(f"shard {shard.url}: corrupt or truncated tar ({type(err).__name__}: {err}); "
                            "rebuild or re-download it") from err
        if current is not None:
            if shard.num_samples is not None and count + 1 > shard.num_samples:
                raise DataError(f"shard {shard.url}: holds more samples than the {shard.num_samples} of its "
                                "manifest; the manifest does not belong to these shards")
            count += 1
            yield current
        if shard.num_bytes is not None and reader.count != shard.num_bytes:
            raise DataError(f"shard {shard.url}: {reader.count} bytes read but the manifest says {shard.num_bytes}; "
                            "the file is truncated or was replaced — rebuild or re-download it")
        if shard.num_samples is not None and count != shard.num_samples:
            raise DataError(f"shard {shard.url}: {count} samples read but the manifest says {shard.num_samples}; "
                            "the file is truncated or corrupt — rebuild or re-download it")
        if shard.sha256 is not None and reader.digest.hexdigest() != shard.sha256:
            raise DataError(f"shard {shard.url}: its sha256 differs from the manifest's: the file was damaged or "
                            "replaced after it was built — rebuild or re-download it")
        completed = True
    finally:
        try:
            raw.close()  # for pipe: this waits for the command and raises on a failing exit status
        except Exception as err:
            # Report a failing command only when nothing else is being raised and the shard was read to the end
            # (a consumer that stops early makes the writer die of SIGPIPE, which is not an error).
            if completed:
                raise DataError(f"shard {shard.url}: the command failed ({err})") from err


# ---------------------------------------------------------------------------------------------------- seeding
def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings, identical in every process (unlike hash())."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


__all__ = [
    "MANIFEST_NAME", "Shard", "Source", "split_source_list", "read_manifest", "resolve_source", "load_sources",
    "sample_key", "sample_member", "is_remote", "count_tar_samples", "iter_shard", "stable_seed",
]
