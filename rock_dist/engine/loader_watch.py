"""Notices when training is input-bound: the step waiting for the data loader instead of computing.

Used by the trainer (`rock_dist.engine.trainer`): it reports every wait for a batch and every finished step; once,
after a warm-up, the watch compares the time spent waiting with the wall time of a window of steps and returns a
warning naming the rates and what to change. The loader's own speed cannot be read from the workers, so it is
inferred from the main process: while the step waits, the loader is what limits the rate.
"""

from __future__ import annotations

import os
import time


class LoaderWatch:
    """Accumulates waits; `after_step` returns one warning when the wait fraction of the window exceeds the limit.

    `skip_steps` first steps are ignored (worker start-up, first decode, allocator warm-up); the next
    `window_steps` are measured. `samples_per_step` counts this rank's samples per optimizer step.
    """

    def __init__(self, *, samples_per_step: int, num_workers: int, skip_steps: int = 5, window_steps: int = 20,
                 threshold: float = 0.2) -> None:
        self.samples_per_step = samples_per_step
        self.num_workers = num_workers
        self.skip_steps = skip_steps
        self.window_steps = window_steps
        self.threshold = threshold
        self._steps = 0
        self._wait = 0.0
        self._start: tuple[float, float] | None = None  # (time, wait) when the window opened
        self.done = False

    def waited(self, seconds: float) -> None:
        self._wait += seconds

    def after_step(self, now: float | None = None) -> str | None:
        """Count one finished step; the warning text once the window shows an input-bound step, else None."""
        if self.done:
            return None
        now = time.perf_counter() if now is None else now
        self._steps += 1
        if self._steps == self.skip_steps:
            self._start = (now, self._wait)
            return None
        if self._start is None or self._steps < self.skip_steps + self.window_steps:
            return None
        self.done = True
        elapsed, waited = now - self._start[0], self._wait - self._start[1]
        if elapsed <= 0 or waited / elapsed <= self.threshold:
            return None
        samples = self.window_steps * self.samples_per_step
        delivered = samples / elapsed
        consumed = samples / max(elapsed - waited, 1e-9)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return (f"warning: training is input-bound: the step waited for data {100 * waited / elapsed:.0f} % of the "
                f"time over steps {self.skip_steps + 1}-{self.skip_steps + self.window_steps}; this rank's "
                f"{self.num_workers} loader worker(s) delivered {delivered:.1f} img/s where the step alone takes "
                f"{consumed:.1f} img/s. Raise --num_workers (this machine has {cpus} CPUs), or rebuild the shards "
                "with --aux_format npy (less decoding per sample)")


__all__ = ["LoaderWatch"]
