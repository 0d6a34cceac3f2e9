"""WebDataset training and evaluation loaders: seeded, split by rank and worker, batched in the workers.

Called by the trainer (`make_train_loader`), evaluation (`make_eval_loader`) and the benchmarks, each with a frozen
spec of what it wants (`rock_dist.data.loader_spec`; commands build theirs from their run plan). Batches follow the
format of `rock_dist.data.batch.collate`; move them with `rock_dist.data.batch.prepare_batch`. Never pass these
loaders through `accelerator.prepare`: the split by rank is done here. docs/data_pipeline.md explains the modes for
users.

Training has two modes (`mode`, the trainer's `--data_mode`):

- **indexed** (default for local shards): random access by sample through a byte-span index of every shard
  (`rock_dist.data.shard_index`). An epoch of each source is one seeded permutation of all its samples, the same on
  every rank, dealt to ranks by sample and to workers by batch (`rock_dist.data.epoch_plan`), so any world size and
  worker count work on any shard count (one shard included), every sample is seen exactly once per epoch over all
  ranks, every rank takes the same number of steps, and batches are drawn from the whole split. The stream's
  position is global (samples consumed by all ranks together): ``start_sample=P`` resumes bit-identically with the
  same layout and exactly (nothing repeated or skipped) with another world size or batch size.
- **stream** (remote ``pipe:`` / http sources, tars the index cannot follow, or when asked): each loader worker of
  each rank draws shards with replacement (RNG seeded by (seed, source, round, rank, worker)), reads them
  sequentially through a sample shuffle buffer that is flushed at the end of each round of draws, and mixes sources
  per sample. Epochs are approximate (a shard may be read twice before another is read once); there is no limit on
  ranks or workers per shard. Resume skips whole rounds by arithmetic on the manifest counts and the rest by reading
  tar members without decoding: bit-identical with the same layout, approximate otherwise.

Both modes augment every sample with its own seeded RNG and run through epochs forever, so every rank can take
exactly as many steps as the trainer asks; `steps_per_epoch` = total samples // (batch size x world size).

Evaluation: shards in manifest order, split by rank (shard r, r + R, ...) when there are at least R shards,
otherwise by sample (global sample index modulo R); then by worker. Every image is seen exactly once over all ranks;
ranks may get different counts. The last batch of each worker may be smaller than batch_size.

Errors inside a worker (corrupt tar, bad member) are sent to the main process as a marker and re-raised there as a
DataError with the original one-line message, instead of DataLoader's multi-line traceback re-wrap.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rock_dist.data.batch import collate
from rock_dist.data.device_augment import BatchAugment, resolve_augment_on
from rock_dist.data.device_decode import DeviceDecoder, resolve_decode_device
from rock_dist.data.loader_spec import DataMode, EvalLoaderSpec, TrainLoaderSpec
from rock_dist.data.epoch_plan import EpochPlan, ShardMap, rank_position
from rock_dist.data.shard_index import IndexUnsupported, ShardIndex, ShardReader, load_or_build_index
from rock_dist.data.sources import Shard, Source, is_remote, iter_shard, load_sources, stable_seed
from rock_dist.data.transforms import EvalTransform, TrainTransform, decode_sample
from rock_dist.errors import ConfigError, DataError



@dataclass(frozen=True)
class WorkerFailure:
    """A DataError raised in a loader worker, carried to the main process as data."""

    message: str


def default_num_workers(world_size: int = 1) -> int:
    """Loader workers per rank for `num_workers=-1`: the CPUs of this machine shared by its local ranks, minus one
    for the training process itself, at least 1 and at most 8 (decoding scales linearly up to there)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", min(world_size, cpus)) or 1)
    return max(1, min(8, cpus // max(1, local) - 1))


def _check_common(image_size: Sequence[int], target_size: Sequence[int], batch_size: int, num_workers: int,
                  rank: int, world_size: int) -> None:
    if len(image_size) != 2 or min(image_size) < 1 or len(target_size) != 2 or min(target_size) < 1:
        raise ConfigError(f"image_size {tuple(image_size)} / target_size {tuple(target_size)}: need two positive ints")
    if batch_size < 1:
        raise ConfigError(f"--batch_size {batch_size}: must be positive")
    if num_workers < -1:
        raise ConfigError(f"--num_workers {num_workers}: use -1 (automatic), 0 (main process) or a positive count")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} / world size {world_size}: need 0 <= rank < world size")


def _worker_id(expected: int) -> tuple[int, int]:
    info = get_worker_info()
    if info is None:
        return 0, 1
    if info.num_workers != max(1, expected):
        raise RuntimeError(f"dataset planned for {expected} workers runs with {info.num_workers}")
    return info.id, info.num_workers


def _buffer_shuffle(samples: Iterable[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Shuffle a stream with a buffer of `size` raw samples; deterministic for a given rng; flushed at the end."""
    if size <= 1:
        yield from samples
        return
    buf: list[dict[str, Any]] = []
    for sample in samples:
        buf.append(sample)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


# ------------------------------------------------------------------------------------------------------ training
@dataclass
class _IndexedPlan:
    """Everything an indexed-mode worker needs; plain data so it pickles into worker processes."""

    urls: list[list[str]]  # per source, per shard
    indexes: list[list[ShardIndex]]  # per source, per shard
    probs: list[float]
    seed: int
    rank: int
    world_size: int
    num_workers: int  # logical workers, >= 1 (0 real workers counts as 1)
    batch_size: int
    start_sample: int  # global stream position of this stream's first sample
    transform: TrainTransform



class _SampleLocator:
    """This rank's q-th sample -> (source, shard number, index in the shard, augmentation seed), keeping the epoch
    plan's caches (permutations, mixing blocks) across calls."""

    def __init__(self, plan: _IndexedPlan) -> None:
        self.plan = plan
        counts = [[len(ix.keys) for ix in src] for src in plan.indexes]
        self.epochs = EpochPlan([sum(c) for c in counts], plan.probs, plan.seed)
        self.maps = [ShardMap(c) for c in counts]

    def __call__(self, first: int, count: int) -> Iterator[tuple[int, int, int, int]]:
        """The samples first .. first + count - 1 of this rank."""
        plan = self.plan
        for q in range(first, first + count):
            s, i, aug = self.epochs.locate(rank_position(plan.start_sample, q, plan.rank, plan.world_size))
            k, local = self.maps[s](i)
            yield s, k, local, aug


class _IndexedDataset(IterableDataset):
    def __init__(self, plan: _IndexedPlan) -> None:
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[Any]:
        plan = self.plan
        worker, nw = _worker_id(plan.num_workers)
        locate = _SampleLocator(plan)
        reader = ShardReader()
        try:
            j = worker  # the DataLoader asks workers round-robin: batch j of the rank comes from worker j mod W
            while True:
                batch = []
                for s, k, local, aug in locate(j * plan.batch_size, plan.batch_size):
                    index = plan.indexes[s][k]
                    raw = reader.read(plan.urls[s][k], index.keys[local], index.spans[local], index.crcs[local])
                    sample = decode_sample(raw, where=f"{plan.urls[s][k]}:{index.keys[local]}",
                                           defer_jpeg=plan.transform.defer_decode)
                    batch.append(plan.transform(sample, random.Random(aug)))
                yield collate(batch)
                j += nw
        except DataError as err:
            yield WorkerFailure(str(err))
        finally:
            reader.close()


@dataclass
class _StreamPlan:
    """Everything a stream-mode worker needs; plain data so it pickles into worker processes."""

    sources: list[Source]
    probs: list[float]
    seed: int
    rank: int
    world_size: int
    num_workers: int  # logical workers, >= 1
    batch_size: int
    shuffle_buffer: int
    start_batch: int  # this rank's batches to skip
    transform: TrainTransform

    def round_shards(self, source_index: int, round_no: int, worker: int) -> list[Shard]:
        """The shards one worker reads in one round: drawn with replacement, as many as an even share of the
        source would give each worker of each rank (at least one)."""
        shards = self.sources[source_index].shards
        draws = max(1, -(-len(shards) // (self.world_size * self.num_workers)))
        rng = random.Random(stable_seed("draw", self.seed, source_index, round_no, self.rank, worker))
        return [shards[rng.randrange(len(shards))] for _ in range(draws)]


def _source_stream(plan: _StreamPlan, s: int, worker: int, skip: int) -> Iterator[tuple[dict[str, Any], int]]:
    """(raw sample, augmentation seed) pairs of source `s` for one worker, through all rounds, after `skip` samples."""
    round_no = 0
    while True:
        shards = plan.round_shards(s, round_no, worker)
        n_round = sum(sh.num_samples or 0 for sh in shards)
        if skip >= n_round:  # skip a whole round without touching the tars
            skip -= n_round
            round_no += 1
            continue
        rng = random.Random(stable_seed("buffer", plan.seed, s, round_no, plan.rank, worker))
        raw = (sample for shard in shards for sample in iter_shard(shard))
        for position, sample in enumerate(_buffer_shuffle(raw, plan.shuffle_buffer, rng)):
            if skip:
                skip -= 1
                continue
            yield sample, stable_seed("augment", plan.seed, s, round_no, plan.rank, worker, position)
        round_no += 1


class _StreamDataset(IterableDataset):
    def __init__(self, plan: _StreamPlan) -> None:
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[Any]:
        plan = self.plan
        physical, nw = _worker_id(plan.num_workers)
        k = plan.start_batch
        # The DataLoader always asks worker 0 first; after skipping k batches the first batch due belongs to the
        # worker that would have produced batch k, so physical workers take over the roles (k + id) mod W.
        worker = (physical + k) % nw
        skip_batches = max(0, (k - worker + nw - 1) // nw)
        skip_samples = skip_batches * plan.batch_size
        try:
            # The mixing decisions depend only on their position, so the choices for the skipped samples are
            # replayed here first, which tells each source how many raw samples to skip.
            mix_rng = random.Random(stable_seed("mix", plan.seed, plan.rank, worker))
            skips = [0] * len(plan.sources)
            for _ in range(skip_samples if len(plan.sources) > 1 else 0):
                skips[_choose(mix_rng, plan.probs)] += 1
            if len(plan.sources) == 1:
                skips[0] = skip_samples
            streams = [_source_stream(plan, s, worker, skips[s]) for s in range(len(plan.sources))]
            batch: list[dict[str, Any]] = []
            while True:
                s = _choose(mix_rng, plan.probs) if len(streams) > 1 else 0
                raw, aug_seed = next(streams[s])
                sample = decode_sample(raw, where=raw.get("__url__", ""), defer_jpeg=plan.transform.defer_decode)
                batch.append(plan.transform(sample, random.Random(aug_seed)))
                if len(batch) == plan.batch_size:
                    yield collate(batch)
                    batch = []
        except DataError as err:
            yield WorkerFailure(str(err))


def _choose(rng: random.Random, probs: list[float]) -> int:
    u = rng.random()
    acc = 0.0
    for i, p in enumerate(probs):
        acc += p
        if u < acc:
            return i
    return len(probs) - 1


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGUSR1 (a preemption notice, engine.supervision) to the training process: a
    scheduler that signals the whole process group must not kill them before the trainer's checkpoint. SIGTERM
    keeps its default: DataLoader and multiprocessing stop workers with it at shutdown, and a worker ignoring it
    would hang the exit; a worker killed by a group-wide SIGTERM is handled by the trainer (engine.trainer)."""
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _loader_kwargs(num_workers: int, persistent: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"batch_size": None, "num_workers": num_workers,
                              "pin_memory": torch.cuda.is_available()}
    if num_workers > 0:
        # Each worker ships whole batches; 4 in flight per worker hides decode jitter without much memory.
        kwargs.update(prefetch_factor=4, persistent_workers=persistent, worker_init_fn=_ignore_stop_signals)
    return kwargs


def _raise_failures(batches: Iterable[Any]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        if isinstance(batch, WorkerFailure):
            raise DataError(batch.message)
        yield batch


def _check_sources(sources: list[Source]) -> None:
    for src in sources:
        if not src.counts_known:
            raise DataError(f"source {src.spec!r}: no sample counts; the training loader plans equal steps per "
                            "rank from manifests")
        empty = [sh.url for sh in src.shards if not sh.num_samples]
        if empty:
            raise DataError(f"shard {empty[0]} of source {src.spec!r} holds no samples; remove it or rebuild")


def _resolve_mode(sources: list[Source], mode: DataMode) -> tuple[Literal["indexed", "stream"],
                                                                   list[list[ShardIndex]] | None]:
    """The mode to run in and, for indexed mode, every shard's index (built on first use)."""
    if mode not in ("auto", "indexed", "stream"):
        raise ConfigError(f"--data_mode {mode!r}: use auto, indexed or stream")
    if mode == "stream":
        return "stream", None
    remote = [src.spec for src in sources if any(is_remote(sh.url) for sh in src.shards)]
    if remote:
        if mode == "indexed":
            raise ConfigError(f"--data_mode indexed needs local shard files; {remote[0]!r} is remote (use "
                              "--data_mode stream or auto)")
        return "stream", None
    try:
        return "indexed", [load_or_build_index(src.shards) for src in sources]
    except IndexUnsupported as err:
        if mode == "indexed":
            raise
        warnings.warn(f"data loader: {err}; falling back to --data_mode stream (approximate epochs)", stacklevel=3)
        return "stream", None


class TrainStream:
    """Endless stream of training batches for one rank (see the module docstring).

    Attributes: `mode` ("indexed" or "stream"), `steps_per_epoch` (equal on every rank), `num_workers` (real
    worker processes), `num_samples` (all sources), `start_sample` (global position of the next iteration's first
    sample), `sources`.
    """

    def __init__(self, sources: list[Source], spec: TrainLoaderSpec, *, start_sample: int = 0) -> None:
        _check_common(spec.image_size, spec.target_size, spec.batch_size, spec.num_workers, spec.rank,
                      spec.world_size)
        if start_sample < 0:
            raise ConfigError(f"start_sample {start_sample}: must be >= 0")
        _check_sources(sources)
        self.spec = spec
        self.sources = sources
        self.mode, indexes = _resolve_mode(sources, spec.mode)
        requested = default_num_workers(spec.world_size) if spec.num_workers == -1 else spec.num_workers
        self.num_workers = requested
        weights = [src.weight if src.weight is not None else float(src.num_samples) for src in sources]
        self.probs = [w / sum(weights) for w in weights]
        self.num_samples = sum(src.num_samples for src in sources)
        self.batch_size = spec.batch_size
        self.world_size = spec.world_size
        self.rank = spec.rank
        self.seed = spec.seed
        self.shuffle_buffer = spec.shuffle_buffer
        self.steps_per_epoch = max(1, self.num_samples // (spec.batch_size * spec.world_size))
        self._indexes = indexes
        self.augment = resolve_augment_on(spec.augment_on, color_jitter=spec.color_jitter,
                                          decode_device=spec.decode_device)
        decode_on = resolve_decode_device(spec.decode_device)
        self._decoder = DeviceDecoder(decode_on, spec.image_size) if decode_on is not None else None
        self._transform = TrainTransform(spec.image_size, spec.target_size, force_crops=spec.force_crops,
                                         no_crops=spec.no_crops, jitter=spec.color_jitter,
                                         defer_decode=decode_on is not None,
                                         defer_augment=self.augment.where == "device")
        self._augment = BatchAugment(self.augment.device, spec.image_size, spec.target_size)
        self.start_sample = int(start_sample)
        self._loader: DataLoader | None = None

    # -- planning ------------------------------------------------------------------------------------------------
    def set_start_sample(self, start_sample: int) -> None:
        """Start the next iteration at global stream position `start_sample` (samples all ranks consumed before)."""
        if start_sample < 0:
            raise ConfigError(f"start_sample {start_sample}: must be >= 0")
        self.start_sample = int(start_sample)
        self._loader = None

    @property
    def exact_resume(self) -> bool:
        """Whether `start_sample` positions the stream exactly for this layout (always in indexed mode; in stream
        mode only at a multiple of batch size x world size, i.e. a position this layout itself reached)."""
        return self.mode == "indexed" or self.start_sample % (self.batch_size * self.world_size) == 0

    def _indexed_plan(self) -> _IndexedPlan:
        assert self._indexes is not None
        return _IndexedPlan(urls=[[sh.url for sh in src.shards] for src in self.sources], indexes=self._indexes,
                            probs=self.probs, seed=self.seed, rank=self.rank, world_size=self.world_size,
                            num_workers=max(1, self.num_workers), batch_size=self.batch_size,
                            start_sample=self.start_sample, transform=self._transform)

    def planned_keys(self, count: int, *, first: int = 0) -> list[str]:
        """Keys of this rank's samples `first` .. `first + count - 1` from `start_sample`, without reading any
        shard (indexed mode only): what the stream will deliver, for tests and audits."""
        if self.mode != "indexed":
            raise ConfigError("planned_keys needs the indexed data mode (stream mode decides while reading)")
        plan = self._indexed_plan()
        return [plan.indexes[s][k].keys[local] for s, k, local, _ in _SampleLocator(plan)(first, count)]

    # -- iteration -----------------------------------------------------------------------------------------------
    def _make_loader(self) -> DataLoader:
        dataset: IterableDataset
        if self.mode == "indexed":
            dataset = _IndexedDataset(self._indexed_plan())
        else:
            per_step = self.batch_size * self.world_size
            dataset = _StreamDataset(_StreamPlan(
                sources=self.sources, probs=self.probs, seed=self.seed, rank=self.rank, world_size=self.world_size,
                num_workers=max(1, self.num_workers), batch_size=self.batch_size, shuffle_buffer=self.shuffle_buffer,
                start_batch=self.start_sample // per_step, transform=self._transform))
        return DataLoader(dataset, **_loader_kwargs(self.num_workers, persistent=True))

    def worker_batches(self) -> Iterator[Mapping[str, Any]]:
        """The batches as the workers ship them, before the training process's steps (GPU decoding, the batched
        augmentation step): what the data benchmark times as worker cost."""
        if self._loader is None:
            self._loader = self._make_loader()
        return _raise_failures(self._loader)

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        batches = self.worker_batches()
        if self._decoder is not None:
            batches = map(self._decoder, batches)
        return map(self._augment, batches)


def make_train_loader(spec: TrainLoaderSpec, *, start_sample: int = 0) -> TrainStream:
    """The training stream of one rank per `spec` (data.loader_spec). Raises DataError/ConfigError before any worker
    starts when the plan cannot work. `start_sample`: global stream position to start at (samples all ranks
    consumed before; see the module docstring)."""
    return TrainStream(load_sources(spec.source), spec, start_sample=start_sample)


# ---------------------------------------------------------------------------------------------------- evaluation
@dataclass
class _EvalPlan:
    per_worker: list[list[tuple[Shard, int]]]  # (shard, global index of its first sample)
    modulo: tuple[int, int] | None  # (world size, rank) when splitting by sample
    batch_size: int
    transform: EvalTransform


def _eval_worker_samples(plan: _EvalPlan, worker: int) -> Iterator[dict[str, Any]]:
    for shard, offset in plan.per_worker[worker]:
        for i, raw in enumerate(iter_shard(shard)):
            if plan.modulo is not None and (offset + i) % plan.modulo[0] != plan.modulo[1]:
                continue  # another rank's sample: skipped before decoding
            yield raw


class _EvalDataset(IterableDataset):
    def __init__(self, plan: _EvalPlan) -> None:
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[Any]:
        worker, _ = _worker_id(len(self.plan.per_worker))
        batch: list[dict[str, Any]] = []
        try:
            for raw in _eval_worker_samples(self.plan, worker):
                batch.append(self.plan.transform(decode_sample(raw, where=raw.get("__url__", ""))))
                if len(batch) == self.plan.batch_size:
                    yield collate(batch)
                    batch = []
            if batch:
                yield collate(batch)
        except DataError as err:
            yield WorkerFailure(str(err))


class EvalLoader:
    """Re-iterable evaluation batches for one rank; `num_samples` (this rank), `len()` = batches of this rank."""

    def __init__(self, source: Source, spec: EvalLoaderSpec) -> None:
        image_size, target_size, batch_size = spec.image_size, spec.target_size, spec.batch_size
        rank, world_size = spec.rank, spec.world_size
        _check_common(image_size, target_size, batch_size, spec.num_workers, rank, world_size)
        if not source.counts_known:
            raise DataError(f"source {source.spec!r}: no sample counts (manifest) for the evaluation split")
        self.source = source
        offsets, acc = [], 0
        for sh in source.shards:
            offsets.append(acc)
            acc += int(sh.num_samples or 0)
        self.total_samples = acc
        indexed = list(zip(source.shards, offsets))
        if len(indexed) >= world_size:
            mine, modulo = indexed[rank::world_size], None
        else:
            # Fewer shards than ranks: every rank reads every shard and keeps one sample in R.
            mine, modulo = indexed, (world_size, rank)
        requested = default_num_workers(world_size) if spec.num_workers == -1 else spec.num_workers
        workers = min(requested, len(mine))
        per_worker = [mine[w::max(1, workers)] for w in range(max(1, workers))]

        def count(items: list[tuple[Shard, int]]) -> int:
            if modulo is None:
                return sum(int(sh.num_samples or 0) for sh, _ in items)
            return sum(1 for sh, off in items for i in range(int(sh.num_samples or 0))
                       if (off + i) % world_size == rank)

        counts = [count(items) for items in per_worker]
        self.num_samples = sum(counts)
        self._num_batches = sum(-(-c // batch_size) for c in counts)
        self.num_workers = workers
        plan = _EvalPlan(per_worker, modulo, batch_size, EvalTransform(image_size, target_size))
        # Persistent workers: evaluation runs many times during training; restarting workers each time costs more
        # than the evaluation of a small split.
        self._loader = DataLoader(_EvalDataset(plan), **_loader_kwargs(workers, persistent=True))

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.num_samples == 0:
            return iter(())
        return _raise_failures(self._loader)


def make_eval_loader(spec: EvalLoaderSpec) -> EvalLoader:
    """Deterministic evaluation batches of one split per `spec` (data.loader_spec); every image exactly once across
    ranks (docs/evaluation.md)."""
    sources = load_sources(spec.source)
    if len(sources) != 1 or sources[0].weight is not None:
        raise ConfigError(f"evaluation source {spec.source!r}: give exactly one split (no mixing, no weights)")
    return EvalLoader(sources[0], spec)


__all__ = ["TrainStream", "EvalLoader", "WorkerFailure", "make_train_loader", "make_eval_loader",
           "default_num_workers", "DataMode", "TrainLoaderSpec", "EvalLoaderSpec"]
