"""Timing rules shared by every benchmark section: warm-up excluded, device synchronised, median of repeats.

Used by `perf.train_bench`, `perf.infer_bench` and `rock_dist.bench`. GPU work is asynchronous, so a timer read
without `torch.cuda.synchronize()` measures only the launch of kernels (the reference's throughput timer had exactly
that bug, SPEC §8b); every window here starts and ends on a synchronised device.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

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

    def rate(self, items_per_iter: float) -> float:
        """Items per second at the median window."""
        median = self.median_s
        return items_per_iter / median if median > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"seconds_per_iter": self.window_s, "median_s": self.median_s, "iters_per_window": self.iters,
                "warmup_iters": self.warmup}


def measure(fn: Callable[[], Any], device: torch.device | str, *, warmup: int, repeats: int, iters: int) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` windows of `iters` calls, each window bracketed by device
    synchronisation. Returns the per-iteration seconds of each window."""
    timing = Timing(iters=max(1, iters), warmup=warmup)
    for _ in range(warmup):
        fn()
    synchronize(device)
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        for _ in range(timing.iters):
            fn()
        synchronize(device)
        timing.window_s.append((time.perf_counter() - start) / timing.iters)
    return timing


__all__ = ["synchronize", "Timing", "measure"]
