"""Process-level set-up: the Accelerator built from a run plan, seeding and RNG state.

Called by `rock_dist.engine.trainer.Trainer` (`make_accelerator`), `rock_dist.evaluate` (`inference_accelerator`)
and, through `engine.step.recipe_step_parts`, by the benchmark and the autotune (`local_accelerator`). What the
machine allows (CUDA present? bf16 supported? which launcher started us?) is decided once, in
`engine.run_plan.resolve_run_plan`; this module only applies the plan's resolved device and precision.
"""

from __future__ import annotations

import datetime
import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from rock_dist.engine.run_plan import RunPlan


def make_accelerator(plan: RunPlan, *, dist_timeout: int, find_unused_parameters: bool,
                     log_with: list[Any] | None = None) -> Any:
    """The Accelerator for training per the run plan (device, precision, accumulation); `dist_timeout`: seconds a
    collective may wait; `log_with`: its experiment trackers (`engine.trackers.log_with`).

    No data loader and no scheduler are ever passed to `prepare` (docs/training.md): the WebDataset stream is split by
    rank in the pipeline, and the LR schedule counts global optimizer steps itself. Gradient accumulation uses
    Accelerate's `accumulate` (no DDP all-reduce on the inner micro-batches, loss divided by the number of
    micro-batches); syncing with a data loader's end is switched off because the stream has no end that all ranks
    reach together.
    """
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = [
        # find_unused_parameters stays available for models with parameters that may get no gradient; the
        # trainer passes False because the builder does not build the branches of untrained tasks, so every
        # parameter gets a gradient and DDP's per-step search for unused ones is not needed (docs/training.md).
        DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters),
        # A finite timeout turns a desynchronised rank into an error instead of an endless hang.
        InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=dist_timeout)),
    ]
    from rock_dist.engine import distributed

    distributed.host_group_timeout_s = float(dist_timeout)
    return _accelerator(cpu=plan.cpu, mixed_precision=plan.accelerate_precision,
                        accumulation_steps=plan.accumulation_steps, handlers=handlers, log_with=log_with)


def inference_accelerator(plan: RunPlan) -> Any:
    """A plain Accelerator for evaluation per the run plan; the CPU is forced when the plan says so, so that a CPU
    multi-process launch uses gloo (docs/training.md)."""
    from accelerate import Accelerator

    return Accelerator(cpu=plan.cpu, mixed_precision=plan.accelerate_precision)


def local_accelerator(mixed_precision: str, *, cpu: bool, accumulation_steps: int = 1) -> Any:
    """An Accelerator for training steps in this one process outside a training run (the benchmark, the autotune),
    set up as the trainer's is.

    Accelerate keeps its state in process-wide singletons that refuse a second precision, and the benchmark times
    fp32 and bf16 recipes in one process, so the singletons are reset first. Earlier Accelerators keep working for
    their prepared models (autocast and grad scaler are fixed at preparation). Never inside a process group: the
    reset would drop the trainer's distributed state (the batch-size probe uses the trainer's Accelerator instead).
    """
    from accelerate.state import AcceleratorState, GradientState

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise RuntimeError("local_accelerator: this process is part of a process group; use its Accelerator")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return _accelerator(cpu=cpu, mixed_precision=mixed_precision, accumulation_steps=accumulation_steps, handlers=[])


def _accelerator(*, cpu: bool, mixed_precision: str, accumulation_steps: int, handlers: list[Any],
                 log_with: list[Any] | None = None) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    plugin = GradientAccumulationPlugin(num_steps=accumulation_steps, sync_with_dataloader=False)
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, gradient_accumulation_plugin=plugin,
                              kwargs_handlers=handlers, step_scheduler_with_optimizer=False,
                              log_with=log_with)
    if mixed_precision == "fp16" and accelerator.device.type == "cpu" and accelerator.scaler is None:
        # Accelerate (1.x) turns fp16 on a CPU into a silent fp32 run: no autocast, no grad scaler. torch has both
        # for the CPU, so switch them on before anything is prepared; prepare(), backward(), clip_grad_norm_() and
        # the optimizer wrapper then take the same fp16 code path as on a GPU (docs/training.md).
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) in this process."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states in a form `torch.load(weights_only=True)` accepts (no NumPy objects)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [str(kind), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`. CUDA states are restored only when the same number of devices is visible."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


__all__ = ["make_accelerator", "inference_accelerator", "local_accelerator",
           "seed_everything", "capture_rng_state", "restore_rng_state"]
