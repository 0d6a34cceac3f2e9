"""WebDataset training and evaluation loaders: sharded, seeded, split by rank and worker, batched in the workers.

Called by the trainer (`make_train_loader`), evaluation (`make_eval_loader`) and the benchmarks. Batches follow
contract §3 (see `rock_dist.data.batch.collate`); move them with `rock_dist.data.batch.prepare_batch`. Never pass
these loaders through `accelerator.prepare` (SPEC §8): the split by rank is done here.

Training stream (per source, per epoch e):
  1. the source's shard list is shuffled with a seed made of (seed, source, e) — identical on every rank;
  2. rank r takes shards r, r + R, ... (R = world size); then worker w of that rank takes every W-th of those;
  3. each worker reads its shards in order through a sample shuffle buffer seeded by (seed, source, e, r, w),
     augments every sample with its own RNG seeded by (seed, source, e, r, w, position), and collates batches.
Several sources are mixed per sample with their weights (RNG seeded by (seed, r, w, first epoch)). Each worker's
stream runs through epochs forever, so every rank can take exactly as many steps as the trainer asks (it stops at
num_iters); `steps_per_epoch` = total samples // (batch size x world size), from the manifests alone.

Worker count: a rank has at least floor(n_shards / R) shards of every source; if that is fewer than the requested
workers, the worker count is reduced (with a warning); a rank without a shard is a DataError at construction.

Resume: ``start_batch=k`` makes this rank's stream start at its k-th batch (counted from `epoch`). The DataLoader
hands out worker batches round-robin, so batch j of the rank is batch j // W of (logical) worker j % W; on resume
physical worker p plays logical worker (p + k) mod W (the loader always starts with worker 0), and each skips its
share of raw samples before decoding (whole epochs are skipped by arithmetic on the manifest counts, the rest by
reading tar members without decoding them). Because every random decision depends only on positions, the resumed
stream is bit-identical to the uninterrupted one, provided seed, sources, world size, num_workers (after the
reduction above), batch_size and shuffle_buffer are unchanged.

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
from typing import Any, Iterable, Iterator, Literal, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rock_dist.data.batch import collate
from rock_dist.data.sources import Shard, Source, iter_shard, load_sources, stable_seed
from rock_dist.data.transforms import EvalTransform, TrainTransform, decode_sample
from rock_dist.errors import ConfigError, DataError

Size = tuple[int, int]


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


def _shuffled(items: list[Any], seed: int) -> list[Any]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


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
class _TrainPlan:
    """Everything a worker needs; plain data so it pickles into worker processes."""

    sources: list[Source]
    probs: list[float]
    seed: int
    rank: int
    world_size: int
    num_workers: int  # effective, >= 1 logical workers (0 real workers counts as 1)
    batch_size: int
    shuffle_buffer: int
    epoch: int
    start_batch: int
    transform: TrainTransform

    def worker_shards(self, source_index: int, epoch: int, worker: int) -> list[Shard]:
        src = self.sources[source_index]
        order = _shuffled(src.shards, stable_seed("shards", self.seed, source_index, epoch))
        return order[self.rank::self.world_size][worker::self.num_workers]


def _source_stream(plan: _TrainPlan, s: int, worker: int, skip: int) -> Iterator[tuple[dict[str, Any], int]]:
    """(raw sample, augmentation seed) pairs of source `s` for one worker, through all epochs, after `skip` samples."""
    epoch = plan.epoch
    while True:
        shards = plan.worker_shards(s, epoch, worker)
        n_epoch = sum(sh.num_samples or 0 for sh in shards)
        if n_epoch == 0:  # cannot happen after planning; guard against an endless loop on empty shards
            raise DataError(f"source {plan.sources[s].spec!r}: rank {plan.rank} worker {worker} has no samples in "
                            f"epoch {epoch}")
        if skip >= n_epoch:  # skip a whole epoch without touching the tars
            skip -= n_epoch
            epoch += 1
            continue
        rng = random.Random(stable_seed("buffer", plan.seed, s, epoch, plan.rank, worker))
        raw = (sample for shard in shards for sample in iter_shard(shard))
        for position, sample in enumerate(_buffer_shuffle(raw, plan.shuffle_buffer, rng)):
            if skip:
                skip -= 1
                continue
            yield sample, stable_seed("augment", plan.seed, s, epoch, plan.rank, worker, position)
        epoch += 1


class _TrainDataset(IterableDataset):
    def __init__(self, plan: _TrainPlan) -> None:
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
            mix_rng = random.Random(stable_seed("mix", plan.seed, plan.rank, worker, plan.epoch))
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
                sample = decode_sample(raw, where=raw.get("__url__", ""))
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


def _loader_kwargs(num_workers: int, persistent: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"batch_size": None, "num_workers": num_workers,
                              "pin_memory": torch.cuda.is_available()}
    if num_workers > 0:
        # Each worker ships whole batches; 4 in flight per worker hides decode jitter without much memory.
        kwargs.update(prefetch_factor=4, persistent_workers=persistent)
    return kwargs


def _raise_failures(batches: Iterable[Any]) -> Iterator[dict[str, torch.Tensor]]:
    for batch in batches:
        if isinstance(batch, WorkerFailure):
            raise DataError(batch.message)
        yield batch


class TrainStream:
    """Endless stream of training batches for one rank (see the module docstring).

    Attributes: `steps_per_epoch` (equal on every rank), `num_workers` (effective), `num_samples` (all sources),
    `epoch` and `start_batch` (where the next iteration starts), `sources`.
    """

    def __init__(self, sources: list[Source], *, image_size: Size, target_size: Size, batch_size: int,
                 num_workers: int, seed: int, rank: int, world_size: int, force_crops: bool = False,
                 no_crops: bool = False, epoch: int = 0, shuffle_buffer: int = 256, start_batch: int = 0,
                 color_jitter: Literal["device", "cpu", "none"] = "device") -> None:
        _check_common(image_size, target_size, batch_size, num_workers, rank, world_size)
        if start_batch < 0 or epoch < 0:
            raise ConfigError(f"start_batch {start_batch} / epoch {epoch}: must be >= 0")
        for src in sources:
            if not src.counts_known:
                raise DataError(f"source {src.spec!r}: no sample counts; the training loader plans equal steps per "
                                "rank from manifests (SPEC §8)")
            if len(src.shards) < world_size:
                raise DataError(f"source {src.spec!r} has {len(src.shards)} shard(s) for {world_size} ranks: some "
                                "rank would get no shard; rebuild with a smaller --samples_per_shard or use fewer "
                                "processes")
            empty = [sh.url for sh in src.shards if not sh.num_samples]
            if empty:
                raise DataError(f"shard {empty[0]} of source {src.spec!r} holds no samples; remove it or rebuild")
        self.sources = sources
        requested = default_num_workers(world_size) if num_workers == -1 else num_workers
        per_rank = min(len(src.shards) // world_size for src in sources)
        effective = min(max(1, requested), per_rank)
        if requested > effective:
            warnings.warn(f"data loader: {requested} workers requested but each rank has only {per_rank} shard(s) "
                          f"of the smallest source; using {effective} workers (rebuild with a smaller "
                          "--samples_per_shard to use more)", stacklevel=2)
        self._real_workers = 0 if requested == 0 else effective
        self.num_workers = self._real_workers
        weights = [src.weight if src.weight is not None else float(src.num_samples) for src in sources]
        total_w = sum(weights)
        self.num_samples = sum(src.num_samples for src in sources)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.steps_per_epoch = max(1, self.num_samples // (batch_size * world_size))
        self._plan = _TrainPlan(sources=sources, probs=[w / total_w for w in weights], seed=seed, rank=rank,
                                world_size=world_size, num_workers=max(1, effective), batch_size=batch_size,
                                shuffle_buffer=shuffle_buffer, epoch=epoch, start_batch=start_batch,
                                transform=TrainTransform(image_size, target_size, force_crops=force_crops, no_crops=no_crops,
                                                         jitter=color_jitter))
        self._loader: DataLoader | None = None

    # -- planning ------------------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._plan.epoch

    @property
    def start_batch(self) -> int:
        return self._plan.start_batch

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of `epoch` (and forget any start_batch)."""
        self._plan.epoch, self._plan.start_batch = int(epoch), 0
        self._loader = None

    def set_start_batch(self, start_batch: int) -> None:
        """Start the next iteration at this rank's batch `start_batch` (counted from `epoch`), for resuming."""
        if start_batch < 0:
            raise ConfigError(f"start_batch {start_batch}: must be >= 0")
        self._plan.start_batch = int(start_batch)
        self._loader = None

    def worker_shards(self, epoch: int | None = None) -> list[list[list[str]]]:
        """Shard URLs per worker of this rank, per source: result[worker][source] -> [url, ...]."""
        e = self.epoch if epoch is None else epoch
        return [[[sh.url for sh in self._plan.worker_shards(s, e, w)] for s in range(len(self.sources))]
                for w in range(self._plan.num_workers)]

    def rank_epoch_samples(self, epoch: int | None = None) -> int:
        """Samples this rank reads in one epoch of every source (ranks may differ: shard sizes differ)."""
        e = self.epoch if epoch is None else epoch
        return sum(int(sh.num_samples or 0) for s in range(len(self.sources)) for w in range(self._plan.num_workers)
                   for sh in self._plan.worker_shards(s, e, w))

    # -- iteration -----------------------------------------------------------------------------------------------
    def _make_loader(self) -> DataLoader:
        return DataLoader(_TrainDataset(self._plan), **_loader_kwargs(self._real_workers, persistent=True))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._loader is None:
            self._loader = self._make_loader()
        return _raise_failures(self._loader)


def make_train_loader(sources: str, *, image_size: Size, target_size: Size, batch_size: int, num_workers: int,
                      seed: int, rank: int, world_size: int, force_crops: bool = False, no_crops: bool = False,
                      epoch: int = 0, shuffle_buffer: int = 256, start_batch: int = 0,
                      color_jitter: Literal["device", "cpu", "none"] = "device") -> TrainStream:
    """The training stream of contract §3 for `sources` (a split directory, brace pattern, pipe: commands, or
    ``SRC[:WEIGHT],...``). Raises DataError/ConfigError before any worker starts when the plan cannot work.

    `color_jitter`: "device" (default) ships the jitter parameters as batch key `color_jitter` for `prepare_batch`
    to apply on the training device; "cpu" applies it in the workers; "none" disables it."""
    return TrainStream(load_sources(sources), image_size=image_size, target_size=target_size, batch_size=batch_size,
                       num_workers=num_workers, seed=seed, rank=rank, world_size=world_size, force_crops=force_crops,
                       no_crops=no_crops, epoch=epoch, shuffle_buffer=shuffle_buffer, start_batch=start_batch, color_jitter=color_jitter)


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

    def __init__(self, source: Source, *, image_size: Size, target_size: Size, batch_size: int, num_workers: int,
                 rank: int, world_size: int) -> None:
        _check_common(image_size, target_size, batch_size, num_workers, rank, world_size)
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
        requested = default_num_workers(world_size) if num_workers == -1 else num_workers
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


def make_eval_loader(split_dir: str, *, image_size: Size, target_size: Size, batch_size: int, num_workers: int,
                     rank: int, world_size: int) -> EvalLoader:
    """Deterministic evaluation batches of one split (a split directory or a single source string); every image
    exactly once across ranks (contract §3)."""
    sources = load_sources(split_dir)
    if len(sources) != 1 or sources[0].weight is not None:
        raise ConfigError(f"evaluation source {split_dir!r}: give exactly one split (no mixing, no weights)")
    return EvalLoader(sources[0], image_size=image_size, target_size=target_size, batch_size=batch_size,
                      num_workers=num_workers, rank=rank, world_size=world_size)


__all__ = ["TrainStream", "EvalLoader", "WorkerFailure", "make_train_loader", "make_eval_loader",
           "default_num_workers"]
