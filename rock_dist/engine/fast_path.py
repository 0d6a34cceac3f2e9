"""The fast path: the ONE place where rock_dist's speed-relevant training and inference choices are applied.

A `Recipe` names every speed-relevant choice (precision, memory format, torch.compile, fused Adam, BatchNorm
folding, where prior matching runs, batch size, loader). `training_recipe(...)` is what the trainer runs with (via
`engine.run_plan.RunPlan.training_recipe`); `inference_recipe()` what `evaluate` and `detect` run with; the
benchmark's reference and fast recipes are chosen in `engine.recipes`, the ladder between them in
`rock_dist.perf.recipes`, and applied by the same functions here.

Who calls what:
- `engine.step.build_step_parts` (the trainer, the benchmark, the autotune and the batch-size probe) calls
  `prepare_model_for_training`, `make_optimizer` and `recipe_matcher`; mixed precision and compile are applied
  there through Accelerate (`accelerate_precision`), after DDP wrapping;
- `rock_dist.evaluate`, `rock_dist.detect` and the benchmark's inference sections call `apply_inference_recipe`.

Order matters and is fixed: move to the device → fold the frozen backbone BatchNorms → channels_last → create the
optimizer (it must see the folded parameters) → (DDP wrap) → torch.compile.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Literal

import torch
from torch import nn

from rock_dist.model.boxes import MatchResult, match_priors
from rock_dist.model.losses import Matcher

if TYPE_CHECKING:
    from rock_dist.model.detector import ROCKDetector

Precision = Literal["fp32", "bf16", "fp16"]
LoaderKind = Literal["reference", "rock_dist"]

# The reference's per-GPU batch (docs/training.md), every recipe's batch unless it says otherwise.
REFERENCE_BATCH = 8
# Accelerate's name of each precision (its `mixed_precision` argument): only where an Accelerator is built.
_ACCELERATE_PRECISION: dict[str, str] = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


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


def accelerate_precision(recipe: Recipe) -> str:
    """The recipe's precision as Accelerate's `mixed_precision` ("no", "bf16" or "fp16")."""
    return accelerate_word(recipe.precision)


def accelerate_word(precision: Precision) -> str:
    """A precision as Accelerate's `mixed_precision` argument ("fp32" is its "no")."""
    return _ACCELERATE_PRECISION[precision]


def training_recipe(device: torch.device, *, precision: Precision, channels_last: bool, compile: bool,
                    fold_bn: bool = False) -> Recipe:
    """The recipe the trainer runs with, from its run plan's settings (`RunPlan.training_recipe`: precision,
    channels_last and compile were resolved there from the flags; 'auto' means on CUDA). It takes the settings,
    not the plan, so that the plan can build recipes without an import cycle. Fused Adam and batched device
    matching are on for every device (same update rule, measured faster on CUDA and CPU). Folding the frozen
    backbone BNs is opt-in (`--fold_backbone_bn`): the forward pass is identical, but Adam and weight decay then
    act on the merged convolution weights instead of the convolution and BN affine weights separately, so the run
    no longer follows the reference recipe's optimisation exactly."""
    return Recipe(name="train", precision=precision, channels_last=channels_last,
                  cudnn_benchmark=device.type == "cuda", compile=compile,
                  fused_adam=fused_adam_available(device), fold_bn=fold_bn, device_matching=True,
                  loader="rock_dist", num_workers=-1)


def inference_recipe() -> Recipe:
    """What `evaluate` and `detect` run with: every conv→BN pair folded (exact in eval mode, one kernel fewer per
    layer); precision comes from their own flags (evaluate's Accelerator), the memory format stays NCHW."""
    return Recipe(name="inference", fold_bn=True, loader="rock_dist", num_workers=-1)


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
    # torch.compile(module) returns an OptimizedModule (an nn.Module); its annotation says only Callable.
    return torch.compile(model) if recipe.compile else model  # type: ignore[return-value]


def autocast_for(recipe: Recipe, device: torch.device | str) -> Callable[[], ContextManager[Any]]:
    """A factory of autocast contexts for the forward pass (a no-op context for fp32)."""
    device = torch.device(device)
    if recipe.precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if recipe.precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------------------ matching
def match_per_image_on_cpu(gt_boxes: torch.Tensor, gt_labels: torch.Tensor, priors: torch.Tensor, **kwargs: Any
                           ) -> MatchResult:
    """`boxes.match_priors`, but one image at a time on the CPU and the result copied to the boxes' device: what
    the reference does (its loader matches each sample on the CPU). Same results as the batched matching.

    gt_boxes B x M x 4, gt_labels B x M (0 = padding), priors P x 4 → MatchResult of B x P tensors.
    """
    device = gt_boxes.device
    boxes_cpu, labels_cpu, priors_cpu = gt_boxes.detach().cpu(), gt_labels.cpu(), priors.detach().cpu()
    parts = []
    for b in range(boxes_cpu.shape[0]):
        n = int((labels_cpu[b] > 0).sum())  # the reference's samples carry only their real boxes, no padding
        parts.append(match_priors(boxes_cpu[b:b + 1, :n], labels_cpu[b:b + 1, :n], priors_cpu, **kwargs))
    return MatchResult(*(torch.cat([getattr(p, f) for p in parts]).to(device) for f in MatchResult._fields))


def recipe_matcher(recipe: Recipe) -> Matcher:
    """The criterion's prior matcher for `recipe`: batched on the batch's device, or per image on the CPU."""
    return match_priors if recipe.device_matching else match_per_image_on_cpu


# ----------------------------------------------------------------------------------------------------- inference
@dataclass
class Applied:
    """A model set up for inference per a recipe.

    `model` is what to call (possibly a torch.compile wrapper); `module` the plain ROCKDetector (for postprocess,
    state dicts); `autocast()` opens the forward pass's precision context.
    """

    recipe: Recipe
    device: torch.device
    model: nn.Module
    module: ROCKDetector
    autocast: Callable[[], ContextManager[Any]]


def apply_inference_recipe(model: ROCKDetector, recipe: Recipe, device: torch.device | str) -> Applied:
    """Set up inference per `recipe`: eval mode, every conv→BN pair folded (exact in eval mode), memory format,
    compile."""
    from rock_dist.model.fuse import fold_all_batchnorm

    device = torch.device(device)
    set_cudnn_benchmark(recipe, device)
    module = model.to(device).eval()
    if recipe.fold_bn and not getattr(module, "folded_batchnorm", None):
        fold_all_batchnorm(module)
    if recipe.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return Applied(recipe, device, maybe_compile(module, recipe), module, autocast_for(recipe, device))


__all__ = [
    "Precision", "LoaderKind", "Recipe", "REFERENCE_BATCH", "accelerate_precision", "accelerate_word",
    "training_recipe", "inference_recipe", "prepare_model_for_training", "set_cudnn_benchmark", "fused_adam_available",
    "make_optimizer", "maybe_compile", "autocast_for", "match_per_image_on_cpu", "recipe_matcher", "Applied",
    "apply_inference_recipe",
]
