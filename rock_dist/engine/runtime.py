"""Process-level set-up for training: device choice, mixed precision, the Accelerator, seeding and RNG state.

Called once by `rock_dist.engine.trainer.train` before anything is built (and `local_accelerator` by the benchmark
and the autotune, through `engine.step.recipe_step_parts`). Everything that depends on the machine
(CUDA present? bf16 supported? which launcher started us?) is decided here, so the training loop itself only ever
sees resolved values.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rock_dist.config import TrainConfig
from rock_dist.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    """Resolved machine-dependent settings (what 'auto' turned into)."""

    cpu: bool
    mixed_precision: str  # "no" | "fp16" | "bf16"
    channels_last: bool
    compile: bool


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    """Turn the 'auto' choices of `cfg` into concrete ones for this machine; ConfigError for impossible requests."""
    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and cfg.cpu:
        raise ConfigError("--device cuda and --cpu contradict each other")
    if cfg.device == "cuda" and not has_cuda:
        raise ConfigError("--device cuda: no CUDA device is visible (use --device cpu or --device auto)")
    # 'auto' on a machine without CUDA must mean CPU explicitly: an Accelerator that is not told cpu=True under a
    # `--multi_gpu` launch on such a machine silently starts N unrelated single processes (docs/training.md).
    cpu = cfg.cpu or cfg.device == "cpu" or (cfg.device == "auto" and not has_cuda)
    # The launcher may also force CPU (ACCELERATE_USE_CPU=1 from `accelerate launch --cpu` or our launch scripts).
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        cpu = True

    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if (not cpu and torch.cuda.is_bf16_supported()) else "no"
    if precision == "fp16" and cpu and not cpu_fp16_supported():
        raise ConfigError(f"--mixed_precision fp16 on the CPU needs torch >= 2.3 (CPU GradScaler), this is "
                          f"{torch.__version__}; use bf16 or no")

    def on_cuda(choice: str) -> bool:
        return choice == "yes" or (choice == "auto" and not cpu)

    return Runtime(cpu=cpu, mixed_precision=precision, channels_last=on_cuda(cfg.channels_last),
                   compile=on_cuda(cfg.compile))


def make_accelerator(cfg: TrainConfig, runtime: Runtime, *, find_unused_parameters: bool,
                     log_with: list[Any] | None = None) -> Any:
    """The Accelerator for training; `log_with`: its experiment trackers (`engine.trackers.log_with`).

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
        InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist_timeout)),
    ]
    from rock_dist.engine import distributed

    distributed.host_group_timeout_s = float(cfg.dist_timeout)
    return _accelerator(cpu=runtime.cpu, mixed_precision=runtime.mixed_precision,
                        accumulation_steps=cfg.gradient_accumulation_steps, handlers=handlers, log_with=log_with)


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


def cpu_fp16_supported() -> bool:
    """Whether torch has fp16 autocast and a GradScaler for the CPU (torch 2.3 added `GradScaler("cpu")`)."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 3) and torch.amp.is_autocast_available("cpu")


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


__all__ = ["Runtime", "resolve_runtime", "make_accelerator", "local_accelerator", "cpu_fp16_supported",
           "seed_everything", "capture_rng_state", "restore_rng_state"]
