"""Training and inference recipes: the ONE place where rock_dist's fast path is defined.

A `Recipe` names every speed-relevant choice (precision, memory format, torch.compile, fused Adam, BatchNorm
folding, where prior matching runs, batch size, loader). `reference_recipe()` is the reference implementation's way
(fp32, batch 8, eager, plain Adam, per-image matching on the CPU, pickle + PIL loader); `fast_recipe(device)` is
what rock_dist does by default on that device; `ladder(...)` lists the intermediate recipes the benchmark measures
so that each change is seen before and after.

Who calls what:
- the benchmark (`rock_dist.bench`, `perf.train_bench`, `perf.infer_bench`) calls `apply_recipe` /
  `apply_inference_recipe`;
- the trainer (`rock_dist.engine.trainer`) calls `prepare_model_for_training` and `make_optimizer` with
  `training_recipe(runtime, device)`, so training and benchmark share the same code. Mixed precision and compile are
  applied by the trainer through Accelerate (`runtime.mixed_precision`, `runtime.compile`), after DDP wrapping.

Order matters and is fixed here: move to the device → fold the frozen backbone BatchNorms → channels_last → create
the optimizer (it must see the folded parameters) → (DDP wrap, trainer only) → torch.compile.
"""

from __future__ import annotations

import contextlib
import os
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Literal, Mapping

import torch
from torch import nn

Precision = Literal["fp32", "bf16", "fp16"]
LoaderKind = Literal["reference", "rock_dist"]

# The reference's per-GPU batch (docs/training.md) and the batch the fast path uses on a GPU (docs/performance.md:
# 32 is where bf16 + compile pay off; 64 adds ~13 % more but needs twice the memory, see
# `memory.find_max_batch_size`).
REFERENCE_BATCH = 8
FAST_GPU_BATCH = 32


@dataclass(frozen=True)
class Recipe:
    """Every speed-relevant training/inference choice. Frozen: derive variants with `dataclasses.replace`."""

    name: str
    batch_size: int = REFERENCE_BATCH
    precision: Precision = "fp32"  # autocast dtype of the forward pass ("fp32": no autocast)
    channels_last: bool = False
    compile: bool = False
    fused_adam: bool = False
    fold_bn: bool = False  # fold frozen backbone BNs (training) / every conv→BN (inference) into the convolutions
    cudnn_benchmark: bool = False  # let cuDNN time its convolution algorithms for our fixed input size (CUDA only)
    device_matching: bool = False  # False: match priors per image on the CPU (the reference, inside its loader)
    loader: LoaderKind = "reference"
    num_workers: int = 2  # loader workers; -1: rock_dist's automatic choice. The reference uses 2.

    def describe(self, *, inference: bool = False, batch_size: int | None = None) -> str:
        """One line listing the switches that are on, for tables and logs (`inference`: only those that matter
        there; `batch_size` overrides the recipe's)."""
        parts = [self.precision, f"batch {batch_size or self.batch_size}"]
        switches = (("channels_last", self.channels_last), ("cuDNN autotune", self.cudnn_benchmark),
                    ("compile", self.compile), ("fused Adam", self.fused_adam and not inference),
                    ("all conv-BN folded" if inference else "BN folded", self.fold_bn))
        parts += [flag for flag, on in switches if on]
        if not inference:
            parts.append("matching on device (batched)" if self.device_matching else "matching per image on CPU")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast has hardware support on `device` (CUDA: compute capability >= 8.0; CPU: what oneDNN
    reports, which does not mean it is faster than fp32 there — see `fast_recipe`)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def onednn_isa_cap() -> str:
    """The ISA cap oneDNN runs under: ONEDNN_MAX_CPU_ISA (or the older DNNL_ name), upper-case; "ALL" when unset."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()


def amx_available() -> bool:
    """Whether the CPU has AMX tile units (Intel Sapphire Rapids and later). There oneDNN runs bf16 convolutions
    2-3x faster than fp32 (README, performance); without AMX, bf16 autocast on a CPU is no faster, often slower."""
    # A cap below AMX (e.g. AVX2, to imitate a CPU without tiles) means oneDNN's bf16 kernels run without them,
    # however the CPU itself reports.
    cap = onednn_isa_cap()
    if cap != "ALL" and "AMX" not in cap:
        return False
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private API: absent in some torch versions
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def reference_recipe(batch_size: int = REFERENCE_BATCH) -> Recipe:
    """The reference implementation's recipe: fp32 eager, plain Adam, per-image CPU matching, pickle+PIL loader."""
    return Recipe(name="reference", batch_size=batch_size)


def fast_recipe(device: torch.device | str, batch_size: int | None = None) -> Recipe:
    """rock_dist's default recipe on `device`.

    On CUDA: bf16 autocast (if supported), channels_last, torch.compile, fused Adam, BN folding, batched matching on
    the GPU, our loader, batch 32. For training, BN folding is the opt-in `--fold_backbone_bn` of rock_dist.train
    (it changes the parametrisation the optimizer sees); for inference it is exact and always used. On a CPU: fused
    Adam, BN folding, batched matching and our loader, plus bf16 autocast and channels_last where the CPU has AMX
    (ResNet-18 at 240x320 on a 2-core Sapphire Rapids: 4.9 img/s fp32 → 13.0 img/s); without AMX the CPU stays fp32
    and NCHW (no faster there). torch.compile stays off on CPUs: over a minute to compile, and slower on the 2-core
    machine. The benchmark's ladder re-measures all of these on any machine.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    cpu_bf16 = device.type == "cpu" and amx_available() and bf16_supported(device)
    return Recipe(name="fast", batch_size=batch_size or (FAST_GPU_BATCH if cuda else REFERENCE_BATCH),
                  precision="bf16" if (cuda and bf16_supported(device)) or cpu_bf16 else "fp32",
                  channels_last=cuda or cpu_bf16,
                  cudnn_benchmark=cuda, compile=cuda, fused_adam=fused_adam_available(device), fold_bn=True,
                  device_matching=True, loader="rock_dist", num_workers=-1)


def ladder(device: torch.device | str, *, batch_size: int | None = None, compile: bool | None = None,
           precision: Precision | None = None) -> list[Recipe]:
    """Reference → fast, one change per row, in the order the changes are applied; the last row is named "fast".

    Rows: reference; +batched matching on the device; +batch N (only when N differs from 8); +bf16/fp16 (when the
    fast recipe uses it); +channels_last; +BN fold; +fused Adam; +compile (when the fast recipe uses it). Each row
    keeps the previous row's changes. channels_last and fused Adam are measured on every device even where the
    fast recipe leaves them off (CPU), so the table shows why; the final "fast" row is then `fast_recipe(device)`
    itself. `compile`/`precision` override the fast recipe's choice (e.g. to measure compile on a CPU).
    """
    device = torch.device(device)
    fast = fast_recipe(device, batch_size)
    fast = dataclasses.replace(fast, precision=precision or fast.precision,
                               compile=fast.compile if compile is None else compile)
    steps: list[tuple[str, dict[str, Any]]] = [
        ("+batched matching", {"device_matching": True}),
        (f"+batch {fast.batch_size}", {"batch_size": fast.batch_size}),
        (f"+{fast.precision}", {"precision": fast.precision}),
        ("+channels_last", {"channels_last": True}),
        ("+cuDNN autotune", {"cudnn_benchmark": fast.cudnn_benchmark}),
        ("+BN fold", {"fold_bn": True}),
        ("+fused Adam", {"fused_adam": True}),
        ("+compile", {"compile": fast.compile}),
    ]
    rows = [reference_recipe()]
    for name, change in steps:
        current = rows[-1]
        if all(getattr(current, k) == v for k, v in change.items()):
            continue  # no change on this device/with these overrides: no row
        rows.append(dataclasses.replace(current, name=name, **change))
    if _switches(rows[-1]) == _switches(fast):
        rows[-1] = dataclasses.replace(fast, name="fast")
    else:
        rows.append(fast)
    return rows


def _switches(recipe: Recipe) -> tuple[Any, ...]:
    """The settings that change the training step (not the name, not the loader)."""
    return (recipe.batch_size, recipe.precision, recipe.channels_last, recipe.cudnn_benchmark, recipe.compile,
            recipe.fused_adam, recipe.fold_bn, recipe.device_matching)


def training_recipe(runtime: Any, device: torch.device | str, *, fold_bn: bool = False) -> Recipe:
    """The recipe the trainer runs with, from its resolved `engine.runtime.Runtime` (mixed precision, channels_last
    and compile were resolved there from the flags; 'auto' means on CUDA). Fused Adam and batched device matching
    are on for every device (same update rule, measured faster on CUDA and CPU). Folding the frozen backbone BNs is
    opt-in (`--fold_backbone_bn`): the forward pass is identical, but Adam and weight decay then act on the merged
    convolution weights instead of the convolution and BN affine weights separately, so the run no longer follows
    the reference recipe's optimisation exactly."""
    device = torch.device(device)
    precision: Precision = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(runtime.mixed_precision, "fp32")
    return Recipe(name="train", precision=precision, channels_last=bool(runtime.channels_last),
                  cudnn_benchmark=device.type == "cuda", compile=bool(runtime.compile),
                  fused_adam=fused_adam_available(device), fold_bn=fold_bn, device_matching=True,
                  loader="rock_dist", num_workers=-1)


# ------------------------------------------------------------------------------------------------------ training
def prepare_model_for_training(model: nn.Module, recipe: Recipe, device: torch.device | str) -> nn.Module:
    """Move `model` to `device`, fold its frozen backbone BatchNorms and set the memory format, per `recipe`.

    In place; returns the model. Call before creating the optimizer. Save its weights with
    `rock_dist.model.fuse.unfolded_state_dict` so that unfolded models can load them.
    """
    from rock_dist.model.fuse import fold_backbone_batchnorm

    set_cudnn_benchmark(recipe, device)
    model = model.to(device)
    if recipe.fold_bn and not getattr(model, "folded_batchnorm", None):
        fold_backbone_batchnorm(model)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def set_cudnn_benchmark(recipe: Recipe, device: torch.device | str) -> None:
    """Apply the recipe's cuDNN autotuning choice (a process-wide switch; only meaningful on CUDA). The input size
    is fixed in training and inference, so the one-off timing of algorithms at the first step pays back."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = recipe.cudnn_benchmark


def fused_adam_available(device: torch.device | str) -> bool:
    """Whether torch has fused Adam kernels for parameters on `device` (CUDA; CPU since torch 2.4)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        major, minor = (int(x) for x in torch.__version__.split(".")[:2])
        return (major, minor) >= (2, 4)
    return False


def make_optimizer(model: nn.Module, recipe: Recipe, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam over the model's trainable parameters; `fused=True` per the recipe (one kernel for all parameters
    instead of ~10 per parameter tensor: the reference's step spends milliseconds in launch overhead)."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    fused = recipe.fused_adam and fused_adam_available(device)
    # With fused=False torch picks its foreach implementation on CUDA; the reference's plain Adam is the same.
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True if fused else None)


def maybe_compile(model: nn.Module, recipe: Recipe) -> nn.Module:
    """torch.compile(model) when the recipe asks for it (the returned wrapper shares the parameters)."""
    return torch.compile(model) if recipe.compile else model


def autocast_for(recipe: Recipe, device: torch.device | str) -> Callable[[], ContextManager[Any]]:
    """A factory of autocast contexts for the forward pass (a no-op context for fp32)."""
    device = torch.device(device)
    if recipe.precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if recipe.precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------- reference-style matching
def match_per_image_on_cpu(gt_boxes: torch.Tensor, gt_labels: torch.Tensor, priors: torch.Tensor, **kwargs: Any
                           ) -> Any:
    """`boxes.match_priors`, but one image at a time on the CPU and the result copied to the boxes' device: what
    the reference does (its loader matches each sample on the CPU). Same results as the batched matching.

    gt_boxes B x M x 4, gt_labels B x M (0 = padding), priors P x 4 → MatchResult of B x P tensors.
    """
    from rock_dist.model.boxes import MatchResult, match_priors

    device = gt_boxes.device
    boxes_cpu, labels_cpu, priors_cpu = gt_boxes.detach().cpu(), gt_labels.cpu(), priors.detach().cpu()
    parts = []
    for b in range(boxes_cpu.shape[0]):
        n = int((labels_cpu[b] > 0).sum())  # the reference's samples carry only their real boxes, no padding
        parts.append(match_priors(boxes_cpu[b:b + 1, :n], labels_cpu[b:b + 1, :n], priors_cpu, **kwargs))
    return MatchResult(*(torch.cat([getattr(p, f) for p in parts]).to(device) for f in MatchResult._fields))


@contextlib.contextmanager
def _matching_function(fn: Callable[..., Any]) -> Iterator[None]:
    """Make the criterion's loss code use `fn` for prior matching while the context is open.

    `model.losses.detection_loss` looks `match_priors` up in its module at call time, so swapping the module
    attribute is enough; the criterion itself stays the model owner's code (nothing of the loss is re-implemented).
    """
    from rock_dist.model import losses

    original = losses.match_priors
    losses.match_priors = fn
    try:
        yield
    finally:
        losses.match_priors = original


class ReferenceMatchingCriterion(nn.Module):
    """Wraps a ROCKCriterion so that matching runs per image on the CPU (the reference recipe). Eager only."""

    def __init__(self, criterion: nn.Module) -> None:
        super().__init__()
        self.criterion = criterion

    def forward(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        with _matching_function(match_per_image_on_cpu):
            return self.criterion(outputs, batch)


class PrematchedCriterion(nn.Module):
    """Wraps a ROCKCriterion for batches whose priors were already matched by the loader (reference-style
    pipeline: `batch["match_labels"]` B x P and `batch["match_boxes"]` B x P x 4 xyxy), so the step does no
    matching of its own."""

    def __init__(self, criterion: nn.Module) -> None:
        super().__init__()
        self.criterion = criterion

    def forward(self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        from rock_dist.model.boxes import MatchResult

        labels, boxes = batch["match_labels"], batch["match_boxes"]
        result = MatchResult(labels, boxes, torch.zeros_like(labels, dtype=torch.float32))
        with _matching_function(lambda *args, **kwargs: result):
            return self.criterion(outputs, batch)


# ------------------------------------------------------------------------------------------------------ applying
@dataclass
class Applied:
    """A model/criterion/optimizer set up per a recipe.

    `model` is what to call (possibly a torch.compile wrapper); `module` the plain ROCKDetector (for postprocess,
    state dicts); `autocast()` opens the forward pass's precision context.
    """

    recipe: Recipe
    device: torch.device
    model: nn.Module
    module: nn.Module
    criterion: nn.Module | None
    optimizer: torch.optim.Optimizer | None
    autocast: Callable[[], ContextManager[Any]]


def apply_recipe(model: nn.Module, criterion: nn.Module, recipe: Recipe, device: torch.device | str, *,
                 lr: float = 5e-5, weight_decay: float = 2e-3, prematched: bool = False) -> Applied:
    """Set up single-process training per `recipe` (the benchmark's path; the trainer uses the same pieces plus
    Accelerate). `prematched`: the batches carry the loader's matching (reference-style loader)."""
    device = torch.device(device)
    module = prepare_model_for_training(model, recipe, device)
    module.train()
    optimizer = make_optimizer(module, recipe, lr=lr, weight_decay=weight_decay)
    criterion = criterion.to(device)
    if prematched:
        criterion = PrematchedCriterion(criterion)
    elif not recipe.device_matching:
        criterion = ReferenceMatchingCriterion(criterion)
    return Applied(recipe, device, maybe_compile(module, recipe), module, criterion, optimizer,
                   autocast_for(recipe, device))


def apply_inference_recipe(model: nn.Module, recipe: Recipe, device: torch.device | str) -> Applied:
    """Set up inference per `recipe`: eval mode, every conv→BN pair folded (exact in eval mode), memory format,
    compile. Returns an `Applied` without criterion and optimizer."""
    from rock_dist.model.fuse import fold_all_batchnorm

    device = torch.device(device)
    set_cudnn_benchmark(recipe, device)
    module = model.to(device).eval()
    if recipe.fold_bn and not getattr(module, "folded_batchnorm", None):
        fold_all_batchnorm(module)
    if recipe.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return Applied(recipe, device, maybe_compile(module, recipe), module, None, None, autocast_for(recipe, device))


__all__ = [
    "Recipe", "REFERENCE_BATCH", "FAST_GPU_BATCH", "bf16_supported", "onednn_isa_cap", "amx_available", "reference_recipe",
    "fast_recipe", "ladder",
    "training_recipe", "set_cudnn_benchmark", "prepare_model_for_training", "make_optimizer", "maybe_compile",
    "autocast_for", "match_per_image_on_cpu", "ReferenceMatchingCriterion", "PrematchedCriterion", "Applied",
    "apply_recipe", "apply_inference_recipe", "fused_adam_available",
]
