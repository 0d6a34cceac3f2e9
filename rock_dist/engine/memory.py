"""The search for the largest training batch that fits on the GPU, and `--auto_batch_size`.

Called by the trainer (`auto_train_batch_size`, for `--auto_batch_size`) and by `rock_dist.bench`
(`--find_max_batch`). `find_max_train_batch_size(model_config, loss_config, recipe, device)` returns the largest
per-process batch whose training step (`engine.step.train_step`, the trainer's own) runs without running out of GPU
memory. On a CPU the question does not apply (memory is the host's, and a too-large batch swaps rather than failing),
so the search refuses with a clear message there.

The search itself, `find_max_batch_size(try_batch, ...)`, is pure logic around a callback (double until the first
out-of-memory, then bisect between the last batch that fitted and the first that did not), so it is tested without
a GPU through a fake memory limit.

Test-only hook (an environment variable, unset in normal use): `ROCK_DIST_FAKE_MEMORY_LIMIT=N` (or `N0,N1,...`, one
per rank) lets the probe and `--auto_batch_size` run on any device, CPU included, and makes the model's forward pass
inside the real training step raise torch.OutOfMemoryError for a batch of more than N images: the whole probe (fresh
parts per attempt, the trainer's step, the clean-up after a failure, the agreement over ranks) runs as on a GPU and
must find a known answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from rock_dist.engine.fast_path import accelerate_precision
from rock_dist.engine.runtime import local_accelerator
from rock_dist.engine.step import recipe_step_parts, train_step
from rock_dist.engine.synthetic_batch import synthetic_batch
from rock_dist.errors import ConfigError

if TYPE_CHECKING:
    from rock_dist.engine.run_plan import RunPlan


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
        except BaseException as err:  # only OOM is swallowed, everything else re-raised
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


FAKE_LIMIT_ENV = "ROCK_DIST_FAKE_MEMORY_LIMIT"


def fake_memory_limit(rank: int = 0) -> int | None:
    """The test hook's batch limit for `rank` (None when `ROCK_DIST_FAKE_MEMORY_LIMIT` is unset)."""
    spec = os.environ.get(FAKE_LIMIT_ENV, "").strip()
    if not spec:
        return None
    try:
        limits = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ConfigError(f"{FAKE_LIMIT_ENV}={spec!r}: expected N or N0,N1,... (images per process)") from None
    return limits[min(rank, len(limits) - 1)]


@contextlib.contextmanager
def _fake_limit(model: torch.nn.Module, limit: int | None) -> Iterator[None]:
    """Make `model`'s forward raise the out-of-memory error of a GPU for batches of more than `limit` images."""
    if limit is None:
        yield
        return

    def check(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        n = int(args[0].shape[0])
        if n > limit:
            raise torch.OutOfMemoryError(f"out of memory ({FAKE_LIMIT_ENV}: a batch of {n} > {limit} images)")

    handle = model.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


def max_batch_not_applicable(device: torch.device | str) -> str | None:
    """Why the batch search cannot run on `device` (None when it can, or when the fake-limit test hook is set)."""
    device = torch.device(device)
    if device.type != "cuda" and fake_memory_limit() is None:
        return (f"the largest-batch search applies to CUDA devices only (device here: {device.type}); on a CPU a "
                "too-large batch swaps instead of failing, so pick --batch_size by throughput")
    return None


def find_max_train_batch_size(model_config: Any, loss_config: Any, recipe: Any, device: torch.device | str, *,
                              accelerator: Any = None, start: int = 2, max_batch: int = 512, multiple_of: int = 2,
                              steps: int = 2) -> MaxBatchResult:
    """Largest per-process training batch of `model_config` under `recipe` that fits on the CUDA `device`.

    Each attempt builds the model fresh (`engine.step.recipe_step_parts`: recipe applied, Accelerate's preparation,
    optimizer state created) and runs `steps` of the trainer's own step (`engine.step.train_step`) on a synthetic
    batch (the second step is the steady state: Adam's state exists from the first). torch.compile is left out of
    the probe: compiled graphs use no more memory than eager ones, and recompiling for every size would take minutes.
    `accelerator`: the trainer's (its precision and accumulation; nothing of it may be prepared yet, since every
    attempt ends with `free_memory`), else a one-process one for the recipe. Leave headroom for fragmentation and
    evaluation when using the result (e.g. 90 %). Raises ConfigError on a non-CUDA device (unless the fake-limit
    test hook is set).
    """
    reason = max_batch_not_applicable(device)
    if reason is not None:
        raise ConfigError(reason)
    device = torch.device(device)
    probe_recipe = dataclasses.replace(recipe, compile=False)
    if accelerator is None:
        accelerator = local_accelerator(accelerate_precision(recipe), cpu=device.type == "cpu")

    limit = fake_memory_limit(accelerator.process_index)

    def try_batch(b: int) -> None:
        parts = None
        try:
            parts = recipe_step_parts(model_config, loss_config, probe_recipe, device, accelerator=accelerator)
            batch = synthetic_batch(b, model_config, seed=0)
            with _fake_limit(parts.model, limit):
                for i in range(steps):
                    train_step(parts, [batch] * parts.accumulation_steps, step=i + 1)
            if device.type == "cuda":  # the tests run the probe on a CPU
                torch.cuda.synchronize(device)
        finally:
            del parts
            accelerator.free_memory()  # Accelerate holds every model and optimizer it prepared
            free_device_memory(device)

    with _grad_scaler_kept(accelerator):
        return find_max_batch_size(try_batch, start=start, max_batch=max_batch, multiple_of=multiple_of,
                                   cleanup=lambda: free_device_memory(device))


@contextlib.contextmanager
def _grad_scaler_kept(accelerator: Any) -> Iterator[None]:
    """Restore the accelerator's fp16 grad scaler after the probe: its steps would otherwise leave the trainer's
    loss scale where random weights took it."""
    scaler = getattr(accelerator, "scaler", None)
    saved = scaler.state_dict() if scaler is not None else None
    try:
        yield
    finally:
        if scaler is not None and saved:
            scaler.load_state_dict(saved)


def auto_train_batch_size(plan: RunPlan, loss_config: Any, recipe: Any, accelerator: Any, *,
                          headroom: float = 0.9, max_batch: int = 512) -> int:
    """A per-process training batch for `--auto_batch_size`: the largest batch of the run plan's model whose trainer
    step fits with the trainer's recipe (`fast_path.training_recipe`) and Accelerator, times `headroom` (room for
    fragmentation and the periodic evaluation), rounded down to an even number, at least 2. CUDA only (ConfigError
    elsewhere; the test hook aside). Call it before the trainer prepares its model. The trainer puts the answer
    into its run plan (`RunPlan.with_batch_size`); the flags are not rewritten.

    Under DDP every rank must use the same value: call it on every rank and take the minimum with an all-reduce.
    """
    result = find_max_train_batch_size(plan.model, loss_config, recipe, accelerator.device,
                                       accelerator=accelerator, max_batch=max_batch)
    return max(2, int(result.batch_size * headroom) // 2 * 2)


__all__ = ["is_out_of_memory", "free_device_memory", "MaxBatchResult", "find_max_batch_size", "FAKE_LIMIT_ENV",
           "fake_memory_limit", "max_batch_not_applicable", "find_max_train_batch_size", "auto_train_batch_size"]
