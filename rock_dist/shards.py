"""`python -m rock_dist.shards build|verify`: official NYUv2 files -> WebDataset shards with manifests, and checks.

build: reads the official files one image at a time (`rock_dist.shardbuild.nyuv2`), encodes each sample
(`rock_dist.shardbuild.shard_writer`) and writes `OUT/{train,test}` (+ `val` with `--val_split_path`), each with
`shard-NNNNNN.tar` files, a `manifest.json` (`rock_dist.data.manifest`) and an `index.json` of every sample's byte
span (`rock_dist.data.shard_index`, for the indexed training loader). Each split's images are dealt to shards in a
seeded random order (`--shuffle_seed`, recorded in the manifest; sorted within a shard): NYUv2 is stored scene by
scene, and shards of consecutive images would each hold one or two scenes. `--samples_per_shard 0` (the default)
sizes shards by `auto_samples_per_shard` (docs/data_pipeline.md). Shards are written by several processes,
each opening the .mat itself (HDF5 handles must not cross a fork). The whole build goes to a hidden temporary
directory next to OUT and is moved into place only when every split is complete, so an interrupted or failed build
leaves the previous output untouched and nothing that looks finished. An OUT that holds a different dataset (other
name or other .mat checksum) is refused unless --overwrite; rebuilding from the same dataset replaces it cleanly.

verify: checks a shard directory against its manifests (file sizes, sha256, sample counts, image ids, modality counts,
that every member decodes, and that index.json, where present, matches the tars), printing every problem and
exiting 1 if there is any.

Examples:
    python -m rock_dist.shards build --dataset_path data/nyu_depth_v2_labeled.mat --splits_path data/splits.mat \
        --normals_path data/normals_gt --val_split_path data/val_split.txt --out shards/nyuv2
    python -m rock_dist.shards verify shards/nyuv2
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import re
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from rock_dist.cli import run_cli
from rock_dist.config import ShardsBuildConfig, ShardsVerifyConfig, parse_config
from rock_dist.data.constants import CLASS_NAMES, SCENE_TYPES
from rock_dist.data.manifest import (MANIFEST_NAME, Manifest, ShardInfo, load_manifest, sha256_file,
                                     source_entry)
from rock_dist.data.shard_index import INDEX_NAME, read_index, scan_shard, write_index
from rock_dist.errors import ConfigError, DataError
from rock_dist.invocation import command_name
from rock_dist.fsutil import pid_alive
from rock_dist.shardbuild.nyuv2 import SPLIT_NAMES, TAR_ERRORS, NYUv2Official
from rock_dist.shardbuild.shard_writer import (check_sample, encode_sample, known_exts, modalities_of, sample_key,
                                               write_shard)
from rock_dist.tasks import catalog

SHARD_PATTERN = "shard-{:06d}.tar"
AUTO_TARGET_SHARDS = 64
AUTO_MIN_SAMPLES = 16
AUTO_MAX_SAMPLES = 1000
_NAME_OK = re.compile(r"^[A-Za-z0-9_-]+$")


# ------------------------------------------------------------------------------------------------------- build
@dataclass(frozen=True)
class _Task:
    """One shard to write: which images, where, and how to encode them."""

    split: str
    shard_no: int
    indices: tuple[int, ...]
    path: str
    key_prefix: str
    image_format: str
    jpeg_quality: int
    aux_format: str


@dataclass
class _Result:
    split: str
    shard_no: int
    info: ShardInfo
    image_ids: list[int]
    modalities: dict[str, int] = field(default_factory=dict)


def _write_task(task: _Task, reader: NYUv2Official, tick: Callable[[str, int], None]) -> _Result:
    """Read, encode and write one shard. Runs in a worker process (or in-process with one worker)."""
    # Fetch the block's normals in one go: a tgz is then decompressed forwards once per shard.
    pairs = reader.normals.read(task.indices) if reader.normals is not None else {}
    counts = dict.fromkeys(catalog.modalities(), 0)

    def samples():
        for i in task.indices:
            sample = reader.read(i, normals=False)
            members = encode_sample(sample, pairs.get(i), key=sample_key(task.key_prefix, i),
                                    image_format=task.image_format, jpeg_quality=task.jpeg_quality,
                                    aux_format=task.aux_format)
            for m in modalities_of(members):
                counts[m] += 1
            tick(task.split, 1)
            yield sample_key(task.key_prefix, i), members

    info = write_shard(task.path, samples())
    return _Result(task.split, task.shard_no, info, list(task.indices), counts)


_WORKER: dict[str, Any] = {}


def _worker_init(reader: NYUv2Official, ticks: Any) -> None:
    # The reader arrives pickled without handles; it opens the .mat (and tgz) in this process on first read.
    _WORKER["reader"] = reader
    _WORKER["ticks"] = ticks


def _worker_run(task: _Task) -> _Result:
    ticks = _WORKER["ticks"]
    return _write_task(task, _WORKER["reader"], lambda split, n: ticks.put((split, n)))


def _remove_stale_temps(out: Path) -> None:
    """Delete temporary build directories of this OUT left by killed builds (their process is gone)."""
    for tmp in out.parent.glob(f".{out.name}.building-*"):
        suffix = tmp.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and not pid_alive(int(suffix)):
            shutil.rmtree(tmp, ignore_errors=True)


def _check_output(out: Path, dataset: str, dataset_sha: str, dataset_file: str, overwrite: bool) -> None:
    """Refuse an OUT that is not a shard directory of this dataset (unless --overwrite for another dataset)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: output exists and is not a directory")
    for split in SPLIT_NAMES:
        split_dir = out / split
        if not split_dir.exists():
            continue
        if not (split_dir / MANIFEST_NAME).is_file():
            # Never delete something we did not write, even with --overwrite.
            raise DataError(f"{split_dir}: exists but has no {MANIFEST_NAME}, so it was not written by the shard "
                            "builder; move it away or choose another --out")
        try:
            old = load_manifest(split_dir)
        except DataError as err:
            if overwrite:
                continue
            raise DataError(f"{err}; pass --overwrite to replace this output") from None
        old_name, old_sha = old.source_fingerprint()
        if (old_name, old_sha) != (dataset, dataset_sha) and not overwrite:
            old_file = next((k for k, v in old.sources.items() if v.get("role") == "dataset"), "?")
            raise DataError(
                f"{out}: already holds a different dataset ({old_name!r} from {old_file}, sha256 "
                f"{str(old_sha)[:12]}…) than the one being built ({dataset!r} from {dataset_file}, sha256 "
                f"{dataset_sha[:12]}…); pass --overwrite to replace it or choose another --out")


def _install(tmp_root: Path, out: Path, splits: Sequence[str]) -> None:
    """Move finished splits from the temporary directory into OUT, replacing (and removing stale) old ones.

    All old splits are moved aside first and the new ones moved in after; if any rename fails, the new splits that
    made it are taken back out and the old ones restored, so a failed install leaves the previous output as it was
    (the caller then deletes `tmp_root`, which holds only the new build).
    """
    out.mkdir(parents=True, exist_ok=True)
    trash = tmp_root / ".replaced"
    trash.mkdir()
    moved_old: list[str] = []
    moved_new: list[str] = []
    try:
        for split in SPLIT_NAMES:
            dst = out / split
            if dst.exists() and (dst / MANIFEST_NAME).exists():
                # A split the new build does not have (e.g. val from an earlier run) must not survive beside it.
                os.rename(dst, trash / split)
                moved_old.append(split)
        for split in splits:
            os.rename(tmp_root / split, out / split)
            moved_new.append(split)
    except BaseException:
        for split in moved_new:
            os.rename(out / split, tmp_root / split)
        for split in moved_old:
            os.rename(trash / split, out / split)
        raise


def _resolve_workers(requested: int, num_tasks: int) -> int:
    if requested == 0 or requested < -1:
        raise ConfigError(f"--num_workers {requested}: use -1 (automatic) or a positive number")
    workers = min(8, os.cpu_count() or 1) if requested == -1 else requested
    return max(1, min(workers, num_tasks))


def auto_samples_per_shard(num_samples: int) -> int:
    """Shard size for a split of `num_samples`: at least AUTO_TARGET_SHARDS shards, so that streaming on 8 ranks x
    8 workers can give every worker a different shard, but no shard under AUTO_MIN_SAMPLES samples (tiny files cost
    more in opens and seeks than they add in mixing) and none over AUTO_MAX_SAMPLES (large sets get more shards)."""
    return max(AUTO_MIN_SAMPLES, min(AUTO_MAX_SAMPLES, -(-num_samples // AUTO_TARGET_SHARDS)))


def shard_order(indices: Sequence[int], seed: int) -> list[int]:
    """The order in which a split's images are dealt to shards: a permutation seeded by `seed` (-1: as given)."""
    if seed < 0:
        return [int(i) for i in indices]
    import numpy as np

    return [int(i) for i in np.random.default_rng(seed).permutation(np.asarray(indices, dtype=np.int64))]


def _validate(cfg: ShardsBuildConfig) -> None:
    if cfg.samples_per_shard < 0:
        raise ConfigError(f"--samples_per_shard {cfg.samples_per_shard}: must be at least 1 (0: automatic)")
    if cfg.shuffle_seed < -1:
        raise ConfigError(f"--shuffle_seed {cfg.shuffle_seed}: use a seed >= 0, or -1 to keep the .mat order")
    if not 1 <= cfg.jpeg_quality <= 100:
        raise ConfigError(f"--jpeg_quality {cfg.jpeg_quality}: must be in 1..100")
    if not _NAME_OK.match(cfg.dataset_name):
        raise ConfigError(f"--dataset_name {cfg.dataset_name!r}: use letters, digits, '-' and '_' only (it prefixes "
                          "WebDataset keys, which must not contain dots)")
    if bool(cfg.normals_path) == cfg.no_normals:
        raise ConfigError("give --normals_path (the normals_gt folder or normals_gt.tgz), or --no_normals to build "
                          "shards without normals" if not cfg.no_normals else
                          "--normals_path and --no_normals contradict each other")


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description:>5}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


def build_shards(cfg: ShardsBuildConfig) -> dict[str, Manifest]:
    """Build all splits into cfg.out (see the module docstring); returns the manifests by split."""
    _validate(cfg)
    started = time.perf_counter()
    reader = NYUv2Official(cfg.dataset_path, cfg.splits_path, None if cfg.no_normals else cfg.normals_path,
                           cfg.val_split_path or None)
    out = Path(cfg.out)
    # Checksums first: whether OUT holds this dataset is decided by the .mat's sha256.
    sources = dict([source_entry(cfg.dataset_path, "dataset"), source_entry(cfg.splits_path, "splits")]
                   + ([source_entry(cfg.normals_path, "normals")] if not cfg.no_normals else [])
                   + ([source_entry(cfg.val_split_path, "val_split")] if cfg.val_split_path else []))
    dataset_sha = sources[Path(cfg.dataset_path).name]["sha256"]
    _check_output(out, cfg.dataset_name, dataset_sha, Path(cfg.dataset_path).name, cfg.overwrite)
    # Absolute, so that `--out .` or `--out ../x` still gets a sibling temporary directory with a real name.
    tmp_root = out.absolute().parent / f".{out.absolute().name}.building-{os.getpid()}"
    _remove_stale_temps(out.absolute())
    tasks: list[_Task] = []
    orders: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    for split, indices in reader.splits.items():
        (tmp_root / split).mkdir(parents=True, exist_ok=True)
        order = shard_order(indices, cfg.shuffle_seed)
        size = sizes[split] = cfg.samples_per_shard or auto_samples_per_shard(len(order))
        orders[split] = []
        for k, start in enumerate(range(0, len(order), size)):
            # Sorted within the shard: a normals tgz is then read forwards within each shard's block.
            block = tuple(sorted(order[start:start + size]))
            orders[split] += block
            tasks.append(_Task(split, k, block,
                               str(tmp_root / split / SHARD_PATTERN.format(k)), cfg.dataset_name, cfg.image_format,
                               cfg.jpeg_quality, cfg.aux_format))
    workers = _resolve_workers(cfg.num_workers, len(tasks))
    results: list[_Result] = []
    try:
        with _progress(not cfg.no_progress) as progress:
            bars = {s: progress.add_task(s, total=len(idx), rate="") for s, idx in reader.splits.items()}
            done = {s: 0 for s in bars}
            t0 = time.perf_counter()

            def tick(split: str, n: int) -> None:
                done[split] += n
                rate = sum(done.values()) / max(time.perf_counter() - t0, 1e-9)
                progress.update(bars[split], advance=n, rate=f"{rate:.1f} img/s")

            if workers == 1:
                results = [_write_task(t, reader, tick) for t in tasks]
            else:
                results = _run_pool(tasks, reader, workers, tick)
        reader.close()

        manifests: dict[str, Manifest] = {}
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for split, indices in reader.splits.items():
            parts = sorted((r for r in results if r.split == split), key=lambda r: r.shard_no)
            modalities = {m: sum(r.modalities[m] for r in parts) for m in catalog.modalities()}
            manifest = Manifest(
                split_dir=tmp_root / split, dataset=cfg.dataset_name, split=split, num_samples=len(indices),
                shards=[r.info for r in parts], class_names=list(CLASS_NAMES), scene_types=list(SCENE_TYPES),
                image_ids=[i for r in parts for i in r.image_ids], modalities=modalities,
                image_size=[reader.height, reader.width], sources=sources, created=created,
                extra={"shuffle_seed": cfg.shuffle_seed, "samples_per_shard": sizes[split]})
            if manifest.image_ids != orders[split]:
                raise RuntimeError(f"shard results of split {split} do not cover its images")  # a bug, not input
            manifest.save()
            write_index(manifest.split_dir / INDEX_NAME, [scan_shard(p) for p in manifest.shard_paths()])
            manifests[split] = manifest
        _install(tmp_root, out, list(manifests))
    finally:
        reader.close()
        shutil.rmtree(tmp_root, ignore_errors=True)

    elapsed = time.perf_counter() - started
    total = sum(m.num_samples for m in manifests.values())
    for split, m in manifests.items():
        m.split_dir = out / split
        print(f"{split}: {m.num_samples} images in {len(m.shards)} shard(s) -> {m.split_dir}")
    print(f"built {total} images with {workers} worker(s) in {elapsed:.1f}s ({total / elapsed:.1f} images/s)")
    return manifests


def _run_pool(tasks: list[_Task], reader: NYUv2Official, workers: int,
              tick: Callable[[str, int], None]) -> list[_Result]:
    # spawn, not fork: a forked child would inherit the parent's open HDF5 state, which h5py does not support.
    ctx = mp.get_context("spawn")
    ticks = ctx.Queue()
    pool = ctx.Pool(workers, initializer=_worker_init, initargs=(reader, ticks))
    try:
        pending = [pool.apply_async(_worker_run, (t,)) for t in tasks]
        results: list[_Result] = []
        while pending:
            try:
                split, n = ticks.get(timeout=0.1)
                tick(split, n)
            except queue.Empty:
                pass
            still = []
            for job in pending:
                if job.ready():
                    results.append(job.get())  # re-raises a worker's DataError here
                else:
                    still.append(job)
            pending = still
        while True:  # the last ticks may still be in flight
            try:
                tick(*ticks.get_nowait())
            except queue.Empty:
                break
        pool.close()
        return results
    finally:
        pool.terminate()
        pool.join()


# ------------------------------------------------------------------------------------------------------ verify
def _iter_tar_samples(path: Path, problems: list[str]):
    """(key, {ext: bytes}) groups of a shard, in order; tar damage is appended to `problems`."""
    key: str | None = None
    members: dict[str, bytes] = {}
    seen: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    problems.append(f"{path}: member {info.name!r} is not a regular file")
                    continue
                name = info.name.rsplit("/", 1)[-1]
                k, _, ext = name.partition(".")
                handle = tar.extractfile(info)
                data = handle.read() if handle is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"{info.name} is cut short")
                if k != key:
                    if key is not None:
                        yield key, members
                    if k in seen:
                        problems.append(f"{path}: sample {k} is split over non-adjacent members")
                    key, members = k, {}
                    seen.add(k)
                if ext in members:
                    problems.append(f"{path}: {name} appears twice")
                members[ext] = data
            # tarfile stops silently when a file is cut at a header boundary; a complete tar ends with two zero
            # blocks right after its last member.
            end = tar.offset
        with open(path, "rb") as handle:
            handle.seek(end)
            if handle.read(1024) != bytes(1024):
                raise tarfile.ReadError(f"no end-of-archive marker at byte {end}")
    except TAR_ERRORS as err:
        problems.append(f"{path}: corrupt or truncated tar ({err})")
    if key is not None:
        yield key, members


def verify_split(manifest: Manifest, *, decode: bool = True) -> list[str]:
    """Problems of one split directory against its manifest (empty list: all good)."""
    problems: list[str] = []
    split_dir = manifest.split_dir
    listed = {s.name for s in manifest.shards}
    for stray in sorted(p.name for p in split_dir.glob("*.tar")):
        if stray not in listed:
            problems.append(f"{split_dir / stray}: not listed in {manifest.path}")
    image_ids: list[int] = []
    counts = dict.fromkeys(catalog.modalities(), 0)
    index_path = split_dir / INDEX_NAME
    index = read_index(index_path) if index_path.exists() else {}
    if index is None:
        problems.append(f"{index_path}: not a readable shard index (delete it; training rebuilds it)")
    for shard in manifest.shards:
        path = split_dir / shard.name
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
            continue
        if index and index.get(shard.name) is not None:
            try:
                if scan_shard(path) != index[shard.name]:
                    problems.append(f"{index_path}: entry of {shard.name} does not match the tar (delete the index; "
                                    "training rebuilds it)")
            except DataError as err:
                problems.append(str(err))
        sha, size = sha256_file(path)
        if size != shard.bytes:
            problems.append(f"{path}: {size} bytes, manifest says {shard.bytes} (truncated or replaced?)")
        if sha != shard.sha256:
            problems.append(f"{path}: sha256 {sha[:12]}… differs from the manifest's {shard.sha256[:12]}…")
        n = 0
        for key, members in _iter_tar_samples(path, problems):
            n += 1
            if not key.startswith(f"{manifest.dataset}_"):
                problems.append(f"{path}: key {key!r} does not start with the dataset name {manifest.dataset!r}")
            if decode:
                facts, found = check_sample(key, members)
                problems.extend(f"{path}: {p}" for p in found)
                if facts["image_id"] is not None:
                    image_ids.append(facts["image_id"])
                size_hw = facts.get("size")
                if size_hw is not None and list(size_hw) != manifest.image_size:
                    problems.append(f"{path}: {key} is {size_hw[0]}x{size_hw[1]}, manifest image_size is "
                                    f"{manifest.image_size[0]}x{manifest.image_size[1]}")
                modalities = facts["modalities"]
            else:
                unknown = [e for e in members if e not in known_exts()]
                if unknown:
                    problems.append(f"{path}: {key} has unknown member(s) {unknown}")
                tail = key.rsplit("_", 1)[-1]
                if tail.isdigit():
                    image_ids.append(int(tail))
                modalities = modalities_of(members)
            for m in modalities:
                counts[m] += 1
        if n != shard.num_samples:
            problems.append(f"{path}: {n} samples, manifest says {shard.num_samples}")
    if image_ids != manifest.image_ids:
        problems.append(f"{split_dir}: image ids in the shards differ from the manifest's "
                        f"({len(image_ids)} found, {len(manifest.image_ids)} listed)")
    for m in catalog.modalities() if image_ids == manifest.image_ids else ():  # else the counts differ for that reason
        if counts[m] != manifest.modalities.get(m, 0):
            problems.append(f"{split_dir}: {counts[m]} samples have {m}, manifest says "
                            f"{manifest.modalities.get(m, 0)}")
    return problems


def verify(path: str | os.PathLike[str], *, decode: bool = True) -> tuple[list[str], list[str]]:
    """(problems, per-split summary lines) for a shard output directory or a single split directory."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: shard directory not found")
    problems: list[str] = []
    if (root / MANIFEST_NAME).exists():
        split_dirs = [root]
    else:
        split_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and (d / MANIFEST_NAME).exists()]
        if not split_dirs:
            raise DataError(f"{root}: no {MANIFEST_NAME} here or in its split subdirectories")
        problems.extend(f"{root / s}: split directory or its {MANIFEST_NAME} missing" for s in ("train", "test")
                        if not (root / s / MANIFEST_NAME).exists())
    summaries: list[str] = []
    manifests: list[Manifest] = []
    for d in split_dirs:
        try:
            manifest = load_manifest(d)
        except DataError as err:
            problems.append(str(err))
            continue
        found = verify_split(manifest, decode=decode)
        problems.extend(found)
        manifests.append(manifest)
        summaries.append(f"{manifest.split}: {manifest.num_samples} samples in {len(manifest.shards)} shard(s) "
                         + ("OK" if not found else f"{len(found)} problem(s)"))
    # Splits of one output must come from one build of one dataset and never share an image.
    fingerprints = {m.source_fingerprint() for m in manifests}
    if len(fingerprints) > 1:
        problems.append(f"{root}: splits come from different datasets/sources {sorted(map(str, fingerprints))}")
    seen: dict[int, str] = {}
    for m in manifests:
        overlap = [i for i in m.image_ids if i in seen]
        if overlap:
            problems.append(f"{m.split_dir}: image {overlap[0]} is also in split {seen[overlap[0]]!r} "
                            f"({len(overlap)} shared)")
        seen.update((i, m.split) for i in m.image_ids)
    return problems, summaries


# --------------------------------------------------------------------------------------------------------- CLI
USAGE = """usage: {command} {{build,verify}} [flags]

  build   official NYUv2 files -> OUT/{{train,test[,val]}}/shard-*.tar + manifest.json
  verify  check a shard directory against its manifests (counts, checksums, decodability)

Run `{command} build --help` or `... verify --help` for the flags."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE.format(command=command_name("rock_dist.shards")))
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "build":
        build_shards(parse_config(ShardsBuildConfig, rest, prog=f"{command_name('rock_dist.shards')} build"))
        return 0
    if command == "verify":
        cfg = parse_config(ShardsVerifyConfig, rest, prog=f"{command_name('rock_dist.shards')} verify")
        problems, summaries = verify(cfg.path, decode=not cfg.no_decode)
        for line in summaries:
            print(line)
        for line in problems:
            print(f"problem: {line}", file=sys.stderr)
        if problems:
            print(f"error: {len(problems)} problem(s) in {cfg.path}", file=sys.stderr)
            return 1
        print(f"{cfg.path}: all shards match their manifests")
        return 0
    raise ConfigError(f"unknown command {command!r}: use `build` or `verify` (see --help)")


if __name__ == "__main__":
    run_cli(main)
