"""Collective helpers for the training loop: world-size checks, agreeing on failures, digests of the weights.

Used by `rock_dist.engine.trainer`. Every function here is called by ALL ranks at the same point (they are
collectives or cheap local checks), so one rank can never leave the others waiting in an all-reduce: failures are
first agreed on with a flag all-reduce, then raised on every rank together.

Test-only fault injection (documented in the README): `ROCK_DIST_FAULT_NONFINITE="STEP:RANK[,STEP:RANK...]"` makes
the training loss of global iteration STEP (1-based optimizer step) on rank RANK non-finite (NaN), so tests can
check that all ranks stop together. `RANK` may be `*` for every rank. Unset in normal use.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any, Iterable

import torch

from rock_dist.errors import ConfigError

FAULT_ENV = "ROCK_DIST_FAULT_NONFINITE"


def check_world_size(accelerator: Any) -> None:
    """Fail when the launcher started more processes than joined the process group.

    `accelerate launch --multi_gpu` on a machine without CUDA (and without CPU forced) starts N processes that each
    believe they are alone (docs/training.md): every one of them would train on the full data and write the same files.
    The launcher's WORLD_SIZE tells us how many there should be.
    """
    expected = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if accelerator.num_processes != expected:
        raise ConfigError(
            f"the launcher started {expected} processes but this one sees a world of {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type}); on a CPU-only machine use "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N` or pass --cpu")


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """True on every rank when `flag` is True on at least one rank (one small all-reduce)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a 1-D float tensor over ranks (identity in a single process). Returns a new tensor."""
    out = values.clone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out


# The gloo group for host-side collectives, per default process group (a new default group needs a new one).
_HOST_GROUPS: dict[int, Any] = {}
# Its timeout: the training run's --dist_timeout (set by engine.runtime.make_accelerator), so that a rank that
# never arrives fails here as it would in the default group, instead of after torch's 30-minute default.
host_group_timeout_s: float | None = None


def host_all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a 1-D CPU tensor over ranks on the host (identity in a single process). Returns a new CPU tensor.

    Under NCCL, an all-reduce of host data would copy it to the GPU and back, and the copy back waits for every
    kernel queued before it; a gloo group of the same ranks sums it on the host, and the GPU's queue keeps running.
    On a gloo default group (CPU training) that group itself is used. Collective: every rank calls it, in the same
    order (the first call creates the group).
    """
    out = values.detach().cpu().clone()
    if not is_distributed():
        return out
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=_host_group())
    return out


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's `value` (collective; `value` itself in a single process). Accelerate's
    `reduce(..., reduction="min")` is not this: it knows only sum, mean and max, and sums anything else."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=_host_group())
    return int(t[0])


def _host_group() -> Any:
    if torch.distributed.get_backend() == "gloo":
        return None  # the default group already reduces on the host
    world = torch.distributed.group.WORLD
    key = id(world)
    if key not in _HOST_GROUPS:
        _HOST_GROUPS.clear()
        timeout = datetime.timedelta(seconds=host_group_timeout_s) if host_group_timeout_s else None
        _HOST_GROUPS[key] = torch.distributed.new_group(backend="gloo", timeout=timeout)
    return _HOST_GROUPS[key]


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (`obj` itself in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (a list of one in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each training forward, so after the last forward every rank holds the
    statistics of its own last batch. Evaluating, checkpointing or finishing with those would make N processes
    disagree with each other and with a 1-process evaluation of the saved weights; this makes them rank 0's, which
    is also what the next DDP forward would have done.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    for buffer in module.buffers():
        torch.distributed.broadcast(buffer.data, src=0)


def parse_fault_spec(spec: str | None) -> set[tuple[int, int | None]]:
    """Parse `ROCK_DIST_FAULT_NONFINITE` into {(step, rank or None for every rank)}."""
    out: set[tuple[int, int | None]] = set()
    if not spec:
        return out
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            step_text, rank_text = item.split(":")
            out.add((int(step_text), None if rank_text.strip() == "*" else int(rank_text)))
        except ValueError:
            raise ConfigError(f"{FAULT_ENV}={spec!r}: expected STEP:RANK[,STEP:RANK...]") from None
    return out


def injected_fault(faults: set[tuple[int, int | None]], step: int, rank: int) -> bool:
    """Whether the test hook asks for a non-finite loss at global iteration `step` (1-based) on `rank`."""
    return (step, rank) in faults or (step, None) in faults


def state_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names and exact bytes of tensors: equal digests mean bit-identical weights across ranks."""
    h = hashlib.sha256()
    for name, tensor in tensors:
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = ["FAULT_ENV", "check_world_size", "any_rank", "all_reduce_sum", "host_all_reduce_sum", "min_over_ranks",
           "gather_objects", "broadcast_buffers",
           "parse_fault_spec",
           "injected_fault", "state_digest"]
