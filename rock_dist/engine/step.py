"""One training step: the function the training loop runs, and the one the benchmark, the autotune and the
batch-size probe time.

`build_step_parts` sets a model, its criterion and Adam up per a `fast_path.Recipe` with an Accelerator, in the
fast path's fixed order (fold BNs, memory format, fused Adam, then Accelerate's preparation: DDP, autocast, grad
scaler; then torch.compile). `train_step(parts, micro_batches, step=...)` is one optimizer step over this rank's K
micro-batches: counts (host data) summed over ranks on the host so the losses are normalised over the global batch
(`engine.normalization`), forward + backward per micro-batch under `accelerator.accumulate`, one all-reduce of the
loss components with a per-rank non-finite flag (a NaN/inf on ANY rank raises NonFiniteLossError on EVERY rank,
before the optimizer step), clipping, the optimizer step and the LR schedule. The step reads the device ONCE: the
reduced losses, flags, gradient norm and GradNorm's norms in one transfer (tests/test_cpu_paths.py holds it to
that). `recipe_step_parts` builds fresh parts from a model configuration.

Called by `engine.trainer.Trainer` (its parts and `Trainer.train_step`), `engine.memory` (the batch-size probe),
`perf.train_bench` (the benchmark's step and end-to-end sections) and `perf.autotune`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from rock_dist.config import LossConfig
from rock_dist.engine.distributed import all_reduce_sum, host_all_reduce_sum, injected_fault
from rock_dist.engine.fast_path import (Recipe, accelerate_precision, make_optimizer, maybe_compile,
                                        prepare_model_for_training, recipe_matcher)
from rock_dist.engine.normalization import loss_ratios, micro_batch_counts, tasks_present
from rock_dist.engine.task_weighting import TaskWeighting
from rock_dist.engine.runtime import local_accelerator
from rock_dist.errors import DataError, NonFiniteLossError
from rock_dist.model.losses import Matcher, ROCKCriterion

# The reference's optimizer settings (docs/training.md), used where no TrainConfig gives them (benchmark, probe).
DEFAULT_LR = 5e-5
DEFAULT_WEIGHT_DECAY = 2e-3


@dataclass
class StepParts:
    """Everything one optimizer step touches.

    `model` is what to call (Accelerate's preparation, compiled per the recipe); `optimizer` Accelerate's wrapper
    (grad scaler, accumulation); `scheduler` the LR schedule stepped once per optimizer step (None: constant LR).
    `world_size` counts the ranks taking part in the step's all-reduces (1: none).
    """

    accelerator: Any
    model: nn.Module
    criterion: ROCKCriterion
    optimizer: torch.optim.Optimizer
    recipe: Recipe
    tasks: tuple[str, ...]
    accumulation_steps: int = 1
    clip_grad_norm: float = 0.0
    scheduler: Any = None
    world_size: int = 1
    rank: int = 0
    faults: set[tuple[int, int | None]] = field(default_factory=set)  # engine.distributed's test-only fault hook
    advice: str = ""  # ends the non-finite loss error: where the last checkpoint is, what to try
    weighting: TaskWeighting | None = None  # the auxiliary weights (None: the criterion's fixed ones)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def build_step_parts(model: nn.Module, criterion: ROCKCriterion, recipe: Recipe, accelerator: Any, *,
                     lr: float = DEFAULT_LR, weight_decay: float = DEFAULT_WEIGHT_DECAY,
                     clip_grad_norm: float = 0.0, lr_lambda: Callable[[int], float] | None = None,
                     local: bool = False) -> StepParts:
    """Set `model` (weights loaded, unfolded) and `criterion` up per `recipe` on the accelerator's device.

    `lr_lambda`: the LR multiplier of a LambdaLR schedule (None: no schedule). `local`: for this process alone, as
    the batch-size probe needs inside a multi-process run: no DDP wrapper (its construction and gradient all-reduces
    are collectives the other ranks' independent probes would not match) and no all-reduce in the step.
    """
    device = accelerator.device
    model = prepare_model_for_training(model, recipe, device)
    model.train()
    optimizer = make_optimizer(model, recipe, lr=lr, weight_decay=weight_decay)
    # Deliberately NOT prepared: a prepared scheduler steps once per process per optimizer step (docs/training.md).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda) if lr_lambda is not None else None
    distributed = accelerator.num_processes > 1 and not local
    if local and accelerator.num_processes > 1:
        model = accelerator.prepare_model(model, evaluation_mode=True)  # autocast without DDP
        optimizer = accelerator.prepare_optimizer(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    return StepParts(accelerator=accelerator, model=maybe_compile(model, recipe), criterion=criterion.to(device),
                     optimizer=optimizer, recipe=recipe, tasks=tuple(criterion.tasks),
                     accumulation_steps=accelerator.gradient_accumulation_steps, clip_grad_norm=clip_grad_norm,
                     scheduler=scheduler, world_size=accelerator.num_processes if distributed else 1,
                     rank=accelerator.process_index if distributed else 0)


def recipe_step_parts(model_config: Any, loss_config: LossConfig, recipe: Recipe, device: torch.device | str, *,
                      accelerator: Any = None, matcher: Matcher | None = None) -> StepParts:
    """Fresh parts of `model_config` (random weights: no pretrained download) per `recipe`, for one process: what
    the benchmark, the autotune and the batch-size probe run.

    Without `accelerator`, a one-process Accelerator with the recipe's precision on `device`'s type
    (`runtime.local_accelerator`); the probe passes the trainer's. `matcher` replaces the recipe's prior matcher
    (the benchmark's reference-style loader delivers batches already matched).
    """
    from rock_dist.model.builder import build_criterion, build_model

    cfg = dataclasses.replace(model_config, pretrained="none")
    if accelerator is None:
        accelerator = local_accelerator(accelerate_precision(recipe), cpu=torch.device(device).type == "cpu")
    criterion = build_criterion(cfg, loss_config, matcher or recipe_matcher(recipe))
    return build_step_parts(build_model(cfg), criterion, recipe, accelerator, local=True)


def _sum_over_ranks(parts: StepParts, values: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(values) if parts.world_size > 1 else values.clone()


def train_step(parts: StepParts, micro_batches: Sequence[Mapping[str, torch.Tensor]], *, step: int,
               before_optimizer_step: Callable[[nn.Module], None] | None = None) -> dict[str, float]:
    """One optimizer step over this rank's K micro-batches (CPU batches of docs/data_format.md).

    `step`: the global iteration this step completes (1-based; for the fault hook and the messages).
    `before_optimizer_step(model)` runs after clipping, just before the optimizer step (diagnostics, tests).
    Returns the global-batch loss components (same values on every rank), "grad_norm" when clipping, and "lr" (the
    lr used). Raises NonFiniteLossError on every rank together when any rank's loss is not finite.
    """
    from rock_dist.data.batch import prepare_batch

    acc = parts.accelerator
    k = len(micro_batches)
    if k != parts.accumulation_steps:
        raise ValueError(f"train_step got {k} micro-batches, expected {parts.accumulation_steps}")
    for batch in micro_batches:
        n = batch["images"].shape[0]
        if n < 2:
            raise DataError(f"rank {parts.rank}: a training batch of {n} image(s); BatchNorm needs at least 2 "
                            "per process")

    counts = [micro_batch_counts(b) for b in micro_batches]
    # Host data all-reduced on the host (engine.distributed.host_all_reduce_sum): a round trip through the
    # accelerator here would make the host wait for the previous step's queued kernels.
    local_counts = torch.stack(counts).sum(0)
    global_counts = host_all_reduce_sum(local_counts) if parts.world_size > 1 else local_counts
    num_micro_global = k * parts.world_size
    lr = parts.optimizer.param_groups[0]["lr"]
    weighting = parts.weighting
    weights = weighting.weights() if weighting is not None else None
    shared = shared_layer_parameters(parts.model) if weighting is not None and weighting.needs_gradient_norms \
        else []
    task_grads = {t: torch.zeros(sum(p.numel() for p in shared), device=parts.device) for t in parts.tasks} \
        if shared else {}

    sums: dict[str, torch.Tensor] = {}
    nonfinite = torch.zeros((), device=parts.device)
    inject = injected_fault(parts.faults, step, parts.rank)
    for batch, count in zip(micro_batches, counts):
        prepared = prepare_batch(batch, parts.device, channels_last=parts.recipe.channels_last)
        with acc.accumulate(parts.model):
            outputs = parts.model(prepared["images"])
            losses = parts.criterion(outputs, prepared, loss_ratios(count, global_counts, num_micro_global), weights)
            del losses["num_pos"]  # a count, not a loss: the step reports the loss components only
            for task, accumulated in task_grads.items():
                # GradNorm: this micro-batch's share of ∇_W L_t on the shared layer; summed over micro-batches and
                # ranks (with the loss components' all-reduce) and divided by M it is the global batch's gradient.
                grads = torch.autograd.grad(losses[f"loss_{task}"], shared, retain_graph=True, allow_unused=True)
                accumulated += torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                          for g, p in zip(grads, shared)])
            loss = losses["loss"]
            if inject:
                loss = losses["loss"] = loss * float("nan")
            nonfinite = torch.maximum(nonfinite, (~torch.isfinite(loss.detach())).float())
            acc.backward(loss)
        for name, value in losses.items():
            sums[name] = sums.get(name, 0) + value.detach().float()
    if not acc.sync_gradients:
        raise RuntimeError("gradient accumulation out of step: the last micro-batch did not sync gradients")

    # One all-reduce per step carries the loss components and one non-finite flag per rank.
    names = sorted(sums)
    flags = torch.zeros(parts.world_size, device=parts.device)
    flags[parts.rank] = nonfinite
    packed = torch.cat([torch.stack([sums[n] for n in names]), flags, *task_grads.values()])
    reduced_all = _sum_over_ranks(parts, packed)
    head = len(names) + parts.world_size
    # Whatever else the step reports from the device rides the same transfer: the clipped gradient norm (clipping
    # only scales the gradients in place, so it may run before the non-finite check) and GradNorm's per-task norms.
    extras: list[torch.Tensor] = []
    norm = acc.clip_grad_norm_(parts.model.parameters(), parts.clip_grad_norm) if parts.clip_grad_norm > 0 \
        else None
    if isinstance(norm, torch.Tensor):
        extras.append(norm.detach().double().reshape(1))
    if task_grads:
        global_grads = reduced_all[head:].view(len(task_grads), -1) / num_micro_global
        extras.append(global_grads.double().norm(dim=1))
    # float32 -> float64 is exact, so every value is the one a separate float()/tolist() would give.
    host = torch.cat([reduced_all[:head].double(), *extras]).tolist()  # THE step's one host synchronisation
    reduced, extra_values = host[:head], host[head:]
    bad_ranks = [r for r, f in enumerate(reduced[len(names):]) if f > 0]
    if bad_ranks:
        parts.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"non-finite training loss at iteration {step} on rank(s) {', '.join(map(str, bad_ranks))}; all "
            f"{parts.world_size} process(es) stopped before the optimizer step.{parts.advice}")
    values = {n: v / num_micro_global for n, v in zip(names, reduced)}

    if norm is not None:
        values["grad_norm"] = extra_values.pop(0) if isinstance(norm, torch.Tensor) else float(norm)
    if before_optimizer_step is not None:
        before_optimizer_step(parts.model)
    parts.optimizer.step()
    if parts.scheduler is not None:
        parts.scheduler.step()  # exactly once per global iteration, on every rank
    parts.optimizer.zero_grad(set_to_none=True)
    values["lr"] = lr
    if weighting is not None and weights is not None:
        present = tasks_present(global_counts, parts.tasks)
        norms = dict(zip(task_grads, extra_values)) if task_grads else None
        weighting.update({t: values[f"loss_{t}"] for t in parts.tasks}, present, norms)
        values.update({f"weight_{t}": w for t, w in weights.items()})  # the weights this step used
    return values


def shared_layer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """GradNorm's W: the affine parameters of the shared ROCK encoder's last layer (its BatchNorm; the ReLU after
    it has none) — the last parameters every auxiliary task's gradient passes through."""
    from rock_dist.engine.checkpoint import unwrap

    rock = getattr(unwrap(model), "rock", None)
    if rock is None:
        raise ValueError("GradNorm needs the ROCK block (a model trained with auxiliary tasks)")
    last_bn = [m for m in rock.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)][-1]
    return [last_bn.weight, last_bn.bias]


__all__ = ["DEFAULT_LR", "DEFAULT_WEIGHT_DECAY", "StepParts", "build_step_parts", "recipe_step_parts", "train_step",
           "shared_layer_parameters"]
