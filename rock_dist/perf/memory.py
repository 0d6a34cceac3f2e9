"""Memory accounting for the benchmark, and the search for the largest training batch that fits on the GPU.

Called by `rock_dist.bench` (peak memory per configuration, `--find_max_batch`) and available to training:
`find_max_train_batch_size(model_config, loss_config, recipe, device)` returns the largest per-process batch whose
training step runs without running out of GPU memory. On a CPU the question does not apply (memory is the host's,
and a too-large batch swaps rather than failing), so the search refuses with a clear message there.

The search itself, `find_max_batch_size(try_batch, ...)`, is pure logic around a callback (double until the first
out-of-memory, then bisect between the last batch that fitted and the first that did not), so it is tested without
a GPU through a fake memory limit.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rock_dist.errors import ConfigError

_MIB = 1024.0 * 1024.0


# -------------------------------------------------------------------------------------------------- measurements
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


def is_out_of_memory(err: BaseException) -> bool:
    """True for the errors a too-large batch raises on a GPU (torch's OOM, or an allocator/cuDNN RuntimeError)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "cudnn_status_alloc_failed" in text
                                              or "cublas_status_alloc_failed" in text)


def free_device_memory(device: torch.device | str) -> None:
    """Release cached blocks after an out-of-memory attempt, so the next attempt starts from a clean allocator."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- the search
@dataclass
class MaxBatchResult:
    """Outcome of `find_max_batch_size`: the largest batch that ran, and every attempt in order."""

    batch_size: int
    first_failure: int | None  # smallest batch seen to fail (None: even `max_batch` fitted)
    attempts: list[tuple[int, bool]] = field(default_factory=list)  # (batch, fitted)
    capped: bool = False  # True when `max_batch` fitted, so the real limit may be higher

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "first_failure": self.first_failure, "capped": self.capped,
                "attempts": [list(a) for a in self.attempts]}


def find_max_batch_size(try_batch: Callable[[int], Any], *, start: int = 2, max_batch: int = 1024,
                        multiple_of: int = 1, is_oom: Callable[[BaseException], bool] = is_out_of_memory,
                        cleanup: Callable[[], None] | None = None) -> MaxBatchResult:
    """Largest batch b in [start, max_batch] (a multiple of `multiple_of`, or `start` itself) for which
    `try_batch(b)` returns without an out-of-memory error.

    Doubling from `start` until the first failure (or `max_batch`), then bisection between the last success and the
    first failure: O(log max_batch) attempts. Assumes fitting is monotone in b (true for memory). Errors that are
    not out-of-memory (per `is_oom`) propagate unchanged; `cleanup` runs after every failed attempt. Raises
    ConfigError when even `start` does not fit.
    """
    if start < 1 or max_batch < start or multiple_of < 1:
        raise ConfigError(f"batch search: need 1 <= start ({start}) <= max_batch ({max_batch}) and "
                          f"multiple_of >= 1 ({multiple_of})")
    attempts: list[tuple[int, bool]] = []
    known: dict[int, bool] = {}

    def fits(b: int) -> bool:
        if b in known:
            return known[b]
        try:
            try_batch(b)
            ok = True
        except BaseException as err:  # noqa: BLE001 - only OOM is swallowed, everything else re-raised
            if not is_oom(err):
                raise
            ok = False
        if not ok and cleanup is not None:
            # Outside the except block: the exception's traceback (and the tensors its frames hold) is gone now.
            cleanup()
        known[b] = ok
        attempts.append((b, ok))
        return ok

    if not fits(start):
        raise ConfigError(f"batch search: even a batch of {start} runs out of memory on this device; use a "
                          "smaller --image_size, a smaller backbone or mixed precision")
    good, bad = start, None
    b = start
    while bad is None:
        nxt = min(b * 2, max_batch)
        if nxt == b:
            break  # reached max_batch and it fitted
        if fits(nxt):
            good, b = nxt, nxt
        else:
            bad = nxt

    def snap(x: int) -> int:
        """Round down to the granularity, never below `start`."""
        return max(start, x - x % multiple_of)

    while bad is not None:
        mid = snap((good + bad) // 2)
        if mid <= good:
            break  # no admissible batch strictly between good and bad
        if fits(mid):
            good = mid
        else:
            bad = mid
    first_failure = min((a for a, ok in attempts if not ok), default=None)
    return MaxBatchResult(batch_size=good, first_failure=first_failure, attempts=attempts,
                          capped=first_failure is None)


def max_batch_not_applicable(device: torch.device | str) -> str | None:
    """Why the batch search cannot run on `device` (None when it can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return (f"the largest-batch search applies to CUDA devices only (device here: {device.type}); on a CPU a "
                "too-large batch swaps instead of failing, so pick --batch_size by throughput")
    return None


def find_max_train_batch_size(model_config: Any, loss_config: Any, recipe: Any, device: torch.device | str, *,
                              start: int = 2, max_batch: int = 512, multiple_of: int = 2, steps: int = 2
                              ) -> MaxBatchResult:
    """Largest per-process training batch of `model_config` under `recipe` that fits on the CUDA `device`.

    Each attempt builds the model fresh (same memory layout as training: recipe applied, optimizer state created)
    and runs `steps` full training steps on a synthetic batch (the second step is the steady state: Adam's state
    exists from the first). torch.compile is left out of the probe: compiled graphs use no more memory than eager
    ones, and recompiling for every size would take minutes. Leave headroom for fragmentation and evaluation when
    using the result (e.g. 90 %). Raises ConfigError on a non-CUDA device.
    """
    import dataclasses

    from rock_dist.model.builder import build_criterion, build_model
    from rock_dist.perf.recipes import apply_recipe
    from rock_dist.perf.train_bench import make_train_step, synthetic_batch

    reason = max_batch_not_applicable(device)
    if reason is not None:
        raise ConfigError(reason)
    device = torch.device(device)
    probe_recipe = dataclasses.replace(recipe, compile=False)
    cfg = dataclasses.replace(model_config, pretrained="none")

    def try_batch(b: int) -> None:
        applied = None
        try:
            applied = apply_recipe(build_model(cfg), build_criterion(cfg, loss_config), probe_recipe, device)
            step = make_train_step(applied)
            batch = synthetic_batch(b, cfg, seed=0)
            for _ in range(steps):
                step(batch)
            torch.cuda.synchronize(device)
        finally:
            del applied
            free_device_memory(device)

    return find_max_batch_size(try_batch, start=start, max_batch=max_batch, multiple_of=multiple_of,
                               cleanup=lambda: free_device_memory(device))


def auto_train_batch_size(model_config: Any, loss_config: Any, runtime: Any, device: torch.device | str, *,
                          headroom: float = 0.9, max_batch: int = 512) -> int:
    """A per-process training batch for `--auto_batch_size`-style use: the largest batch that fits for the trainer's
    recipe (`recipes.training_recipe(runtime, device)`), times `headroom` (room for fragmentation and the periodic
    evaluation), rounded down to an even number, at least 2. CUDA only (ConfigError elsewhere).

    Under DDP every rank must use the same value: call it on every rank and take the minimum with an all-reduce.
    """
    from rock_dist.perf.recipes import training_recipe

    result = find_max_train_batch_size(model_config, loss_config, training_recipe(runtime, device), device,
                                       max_batch=max_batch)
    return max(2, int(result.batch_size * headroom) // 2 * 2)


__all__ = ["reset_peak_memory", "peak_memory_mib", "rss_mib", "is_out_of_memory", "free_device_memory",
           "MaxBatchResult", "find_max_batch_size", "max_batch_not_applicable", "find_max_train_batch_size",
           "auto_train_batch_size"]
