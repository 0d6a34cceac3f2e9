"""The sample-level epoch plan of the indexed training loader: which sample sits at each global stream position.

Used by `rock_dist.data.pipeline` (in the main process and in every loader worker) and by its tests; pure
arithmetic on seeds and sample counts, no I/O. docs/data_pipeline.md describes the plan for users.

The training run reads one endless *global stream* of sample positions p = 0, 1, 2, ... shared by all ranks:

- mixing: with several sources, position p draws its source from the mixing weights with an RNG seeded by
  (seed, p // BLOCK); the source-local position t of p is how many earlier positions drew the same source;
- epochs: source s's positions t = e * N_s ... (e + 1) * N_s - 1 are a seeded permutation of its N_s samples
  (seed, s, e), so each epoch of a source visits every sample exactly once, in an order independent of the shards;
- ranks: rank r of R takes positions start + r, start + r + R, ... (its q-th sample is start + q * R + r), so every
  rank takes the same number of samples and steps, and a window of R * k consecutive positions goes to the ranks
  without overlap or gap. Batch j of a rank is its samples j * B ... j * B + B - 1; loader worker w computes the
  batches j with j mod W = w;
- augmentation: the sample at position p is augmented with an RNG seeded by (seed, p).

Because everything is a function of p, resuming at a global position gives the same samples and augmentations as
the uninterrupted run for any world size, batch size or worker count, and none is repeated or skipped.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from rock_dist.data.sources import stable_seed

MIX_BLOCK = 4096  # positions whose source draws come from one RNG (cheap to replay when resuming far in)


class _LRU(OrderedDict[Any, Any]):
    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def remember(self, key: object, value: object) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


class EpochPlan:
    """Global position -> (source, sample index within the source, augmentation seed), see the module docstring.

    `sizes[s]` is the number of samples of source s (its shards concatenated in manifest order); `probs[s]` its
    mixing probability (ignored with one source).
    """

    def __init__(self, sizes: Sequence[int], probs: Sequence[float], seed: int) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"every source needs at least one sample, got sizes {list(sizes)}")
        if len(probs) != len(sizes):
            raise ValueError("one mixing probability per source")
        self.sizes = [int(n) for n in sizes]
        self.probs = np.asarray(probs, dtype=np.float64) / float(np.sum(probs))
        self.seed = int(seed)
        self._perms = _LRU(4)
        self._blocks = _LRU(4)
        self._counts_before: list[np.ndarray] = [np.zeros(len(sizes), dtype=np.int64)]

    # -- mixing --------------------------------------------------------------------------------------------------
    def _block(self, b: int) -> np.ndarray:
        if b not in self._blocks:
            rng = np.random.default_rng(stable_seed("mix", self.seed, b))
            self._blocks.remember(b, rng.choice(len(self.sizes), size=MIX_BLOCK, p=self.probs))
        return self._blocks[b]

    def _before(self, b: int) -> np.ndarray:
        """Positions of each source in all blocks before block b."""
        while len(self._counts_before) <= b:
            k = len(self._counts_before) - 1
            counts = np.bincount(self._block(k), minlength=len(self.sizes))
            self._counts_before.append(self._counts_before[-1] + counts)
        return self._counts_before[b]

    def source_position(self, p: int) -> tuple[int, int]:
        """(source s, source-local position t) of global position p."""
        if len(self.sizes) == 1:
            return 0, p
        b, i = divmod(p, MIX_BLOCK)
        block = self._block(b)
        s = int(block[i])
        return s, int(self._before(b)[s]) + int(np.count_nonzero(block[:i] == s))

    # -- epochs --------------------------------------------------------------------------------------------------
    def permutation(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._perms:
            rng = np.random.default_rng(stable_seed("epoch", self.seed, s, epoch))
            self._perms.remember(key, rng.permutation(self.sizes[s]))
        return self._perms[key]

    def locate(self, p: int) -> tuple[int, int, int]:
        """(source, sample index within the source, augmentation seed) of global position p."""
        if p < 0:
            raise ValueError(f"stream position {p} < 0")
        s, t = self.source_position(p)
        epoch, i = divmod(t, self.sizes[s])
        return s, int(self.permutation(s, epoch)[i]), stable_seed("augment", self.seed, p)


def rank_position(start: int, q: int, rank: int, world_size: int) -> int:
    """Global position of rank `rank`'s q-th sample of a stream that starts at global position `start`."""
    return start + q * world_size + rank


class ShardMap:
    """Sample index within a source -> (shard number, index within the shard), by cumulative counts."""

    def __init__(self, counts: Sequence[int]) -> None:
        self.starts = list(np.cumsum([0, *counts[:-1]]))

    def __call__(self, index: int) -> tuple[int, int]:
        k = bisect.bisect_right(self.starts, index) - 1
        return k, index - int(self.starts[k])


__all__ = ["EpochPlan", "ShardMap", "rank_position", "MIX_BLOCK"]
