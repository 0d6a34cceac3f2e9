"""Memory accounting for the benchmark: peak GPU memory per configuration, and the process's resident set size.

Called by `perf.train_bench`, `perf.infer_bench` (a row's "peak GPU MiB" and "RSS MiB"). The largest-batch search
lives with the trainer that uses it (`engine.memory`).
"""

from __future__ import annotations

import gc
import os

import torch

_MIB = 1024.0 * 1024.0


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory window on `device` (CUDA only; nothing to do on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device | str) -> float | None:
    """Peak memory allocated by tensors on `device` since the last reset, in MiB; None on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _MIB
    return None


def rss_mib() -> float:
    """Resident set size of this process now, in MiB (on the CPU the closest thing to "memory of this config")."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / _MIB
    except (OSError, ValueError, IndexError):
        import resource  # not Linux: the peak is all there is

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


__all__ = ["reset_peak_memory", "peak_memory_mib", "rss_mib"]
