"""Timing rules shared by every benchmark section: warm-up excluded, device synchronised, median of repeats.

Used by `perf.train_bench`, `perf.infer_bench` and `rock_dist.bench`. GPU work is asynchronous, so a timer read
without `torch.cuda.synchronize()` measures only the launch of kernels (the reference's throughput timer had exactly
that bug, docs/reference_differences.md); every window here starts and ends on a synchronised device.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for all queued work on `device` (a no-op on the CPU, whose ops are synchronous)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per iteration of each timed window (one window = `iters` iterations); `median_s` is what to report."""

    window_s: list[float] = field(default_factory=list)  # seconds per iteration, one entry per window
    iters: int = 1
    warmup: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.window_s) if self.window_s else float("nan")

    @property
    def spread(self) -> float:
        """Relative spread of the windows (`relative_spread`)."""
        return relative_spread(self.window_s)

    def rate(self, items_per_iter: float) -> float:
        """Items per second at the median window."""
        median = self.median_s
        return items_per_iter / median if median > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"seconds_per_iter": self.window_s, "median_s": self.median_s, "iters_per_window": self.iters,
                "warmup_iters": self.warmup, "spread": self.spread}


def measure(fn: Callable[[], Any], device: torch.device | str, *, warmup: int, repeats: int, iters: int) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` windows of `iters` calls, each window bracketed by device
    synchronisation. Returns the per-iteration seconds of each window."""
    timing = Timing(iters=max(1, iters), warmup=warmup)
    for _ in range(warmup):
        fn()
    synchronize(device)
    for _ in range(max(1, repeats)):
        _time_window(fn, device, timing)
    return timing


def _time_window(fn: Callable[[], Any], device: torch.device | str, timing: Timing) -> None:
    """One window: `timing.iters` calls of `fn` on a device synchronised at its end; appends seconds per call."""
    start = time.perf_counter()
    for _ in range(timing.iters):
        fn()
    synchronize(device)
    timing.window_s.append((time.perf_counter() - start) / timing.iters)


def measure_interleaved(fns: Sequence[Callable[[], Any]], device: torch.device | str, *, warmup: int,
                        min_rounds: int, max_rounds: int, iters: int, target_spread: float = 0.05
                        ) -> tuple[list[Timing], list[list[float]]]:
    """Time several configurations fairly on a noisy machine: after `warmup` untimed calls of each, every round
    times one window of `iters` calls per configuration, in turn, so a change of machine load hits them all alike.
    Rounds go on (at least `min_rounds`, at most `max_rounds`) until the ratio of every configuration to the
    first one is stable: the relative spread of its per-round ratios (`relative_spread`) is at most `target_spread`.

    Returns each configuration's Timing and, per configuration, its per-round ratio to the first (time of the
    first / time of this one, i.e. its speed-up), whose median and spread the benchmark reports."""
    timings = [Timing(iters=max(1, iters), warmup=warmup) for _ in fns]
    for fn in fns:
        for _ in range(warmup):
            fn()
    synchronize(device)
    ratios: list[list[float]] = [[] for _ in fns]
    for round_index in range(max(1, max_rounds)):
        for fn, timing in zip(fns, timings):
            _time_window(fn, device, timing)
        for k, timing in enumerate(timings):
            ratios[k].append(timings[0].window_s[-1] / timing.window_s[-1])
        if round_index + 1 >= max(1, min_rounds) and all(relative_spread(r) <= target_spread for r in ratios):
            break
    return timings, ratios


def relative_spread(values: Sequence[float]) -> float:
    """Relative spread of repeated measurements (window times, per-round ratios): interquartile range / median from 4
    values on (one slow round on a shared 2-core machine then does not hold the others hostage), (largest -
    smallest) / median below that, 0 for one."""
    if len(values) < 2:
        return 0.0
    if len(values) < 4:
        return (max(values) - min(values)) / statistics.median(values)
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / statistics.median(values)


__all__ = ["synchronize", "Timing", "measure", "measure_interleaved", "relative_spread"]
