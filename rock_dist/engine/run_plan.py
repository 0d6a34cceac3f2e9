"""The run plan: every setting a command runs with, resolved ONCE from its flags, the machine and the data.

`resolve_run_plan(cfg)` is called once per command (`engine.trainer.Trainer`, `rock_dist.evaluate`,
`rock_dist.detect`, `rock_dist.bench`) and returns a frozen `RunPlan`: the device, the precision in ONE vocabulary
(`fast_path.Precision`: "fp32", "bf16", "fp16"; Accelerate's "no" exists only where an Accelerator is built), the
memory format and torch.compile, the model configuration resolved against the vocabulary of the training shards,
the batch per process with its origin (flag, `--auto_batch_size` probe or resumed checkpoint), accumulation and the
global batch, the auxiliary target size (from the priors) and the post-processing settings. Nothing downstream
reads the 'auto' flags again; the loaders get their `data.loader_spec` objects from the plan
(`train_loader_spec`, `eval_loader_spec`).

Two facts are only known after the plan exists, and each has one named step that returns a new plan (the plan
itself never changes): the architecture and saved post-processing of a weights file (`with_weights`, evaluate and
detect) and the batch found by the `--auto_batch_size` probe, which needs the run's Accelerator
(`with_batch_size`). The flags object is never rewritten. See docs/architecture.md, "The run plan".
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import torch

from rock_dist.config import (POSTPROCESS_FIELDS, BenchConfig, DataConfig, DetectConfig, EvaluateConfig, LossConfig,
                              ModelConfig, TrainConfig, resolve_postprocess)
from rock_dist.errors import ConfigError

if TYPE_CHECKING:
    from rock_dist.data.loader_spec import EvalLoaderSpec, TrainLoaderSpec
    from rock_dist.engine.fast_path import Precision, Recipe

DeviceKind = Literal["cpu", "cuda"]
BatchOrigin = Literal["flag", "auto", "checkpoint"]
# The flags' precision words, in the plan's vocabulary (train/evaluate say "no", the bench says "fp32").
_PRECISION_WORDS: dict[str, str] = {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


# ------------------------------------------------------------------------------------------ device and precision
def cpu_forced_by_launcher() -> bool:
    """Whether the launcher forces the CPU (ACCELERATE_USE_CPU=1 from `accelerate launch --cpu` or our launch
    scripts): every command's 'auto' must agree with the Accelerator, which honours it (docs/training.md)."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def resolve_device(choice: str, *, cpu_flag: bool = False) -> DeviceKind:
    """'cuda' or 'cpu' for a --device choice ('auto', 'cuda', 'cpu'); ConfigError for an impossible request.

    'auto' on a machine without CUDA must mean CPU explicitly: an Accelerator that is not told cpu=True under a
    `--multi_gpu` launch on such a machine silently starts N unrelated single processes (docs/training.md)."""
    has_cuda = torch.cuda.is_available()
    if choice == "cuda" and cpu_flag:
        raise ConfigError("--device cuda and --cpu contradict each other")
    if choice == "cuda" and not has_cuda:
        raise ConfigError("--device cuda: no CUDA device is visible (use --device cpu or --device auto)")
    if cpu_flag or choice == "cpu" or not has_cuda or cpu_forced_by_launcher():
        return "cpu"
    return "cuda"


def cpu_fp16_supported() -> bool:
    """Whether torch has fp16 autocast and a GradScaler for the CPU (torch 2.3 added `GradScaler("cpu")`)."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 3) and torch.amp.is_autocast_available("cpu")


def resolve_precision(choice: str, device: DeviceKind, *, training: bool, flag: str = "--mixed_precision"
                      ) -> Precision:
    """The autocast precision for a flag value ('auto', 'no'/'fp32', 'bf16', 'fp16') on `device`.

    'auto' is bf16 on a GPU that supports it, else fp32. fp16 on the CPU trains with torch's CPU GradScaler where
    torch has one (2.3+); inference refuses it (its plain Accelerator would silently run fp32 there)."""
    if choice == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if choice not in _PRECISION_WORDS:
        raise ConfigError(f"{flag} {choice}: choose from auto, no, fp32, bf16, fp16")
    if choice == "fp16" and device == "cpu":
        if not training:
            raise ConfigError(f"{flag} fp16 needs a GPU; on CPU use bf16 or no")
        if not cpu_fp16_supported():
            raise ConfigError(f"{flag} fp16 on the CPU needs torch >= 2.3 (CPU GradScaler), this is "
                              f"{torch.__version__}; use bf16 or no")
    precision: Any = _PRECISION_WORDS[choice]
    return precision


def on_cuda_by_default(choice: str, device: DeviceKind) -> bool:
    """A yes/no/auto switch whose 'auto' means "on CUDA" (channels_last, torch.compile)."""
    return choice == "yes" or (choice == "auto" and device == "cuda")


def launcher_layout() -> tuple[int, int]:
    """(world size, rank) the launcher gave this process (1, 0 without a launcher); `check_layout` holds the
    Accelerator to it. RANK counts only beside WORLD_SIZE: a stray RANK from a scheduler does not make a plain
    `python -m rock_dist.train` a rank of a group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world_size, int(os.environ.get("RANK", "0") or 0) if world_size > 1 else 0


# -------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Postprocess:
    """Detection decoding settings (config.POSTPROCESS_FIELDS): training's validation, saved with the weights, read
    back by evaluate, detect and the inference bench (docs/weights.md)."""

    score_threshold: float = 0.05
    nms_iou: float = 0.3
    max_detections: int = 100
    conf_threshold: float = 0.4

    @classmethod
    def of(cls, loss: LossConfig) -> Postprocess:
        return cls(**{name: getattr(loss, name) for name in POSTPROCESS_FIELDS})

    def loss_config(self, base: LossConfig | None = None) -> LossConfig:
        """`base` (default: LossConfig's defaults) with these settings."""
        return dataclasses.replace(base or LossConfig(), **dataclasses.asdict(self))


@dataclass(frozen=True)
class RunPlan:
    """What a command runs with, every 'auto' resolved (see the module docstring)."""

    device: DeviceKind
    precision: Precision
    channels_last: bool = False
    compile: bool = False
    world_size: int = 1
    rank: int = 0
    # Resolved against the training shards' vocabulary (train) or read from the weights file (evaluate, detect).
    model_config: ModelConfig | None = None
    class_names: tuple[str, ...] = ()
    scene_types: tuple[str, ...] = ()
    batch_size: int = 1  # images per process per (micro-)batch
    batch_origin: BatchOrigin = "flag"
    accumulation_steps: int = 1
    postprocess: Postprocess = field(default_factory=Postprocess)

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def training_recipe(self, *, fold_bn: bool = False) -> Recipe:
        """The recipe the trainer runs with (`engine.fast_path.training_recipe` of this plan's settings)."""
        from rock_dist.engine.fast_path import training_recipe

        return training_recipe(self.torch_device, precision=self.precision, channels_last=self.channels_last,
                               compile=self.compile, fold_bn=fold_bn)

    @property
    def accelerate_precision(self) -> str:
        """The precision as Accelerate's `mixed_precision` argument ("no", "bf16", "fp16")."""
        from rock_dist.engine.fast_path import accelerate_word

        return accelerate_word(self.precision)

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all processes."""
        return self.batch_size * self.accumulation_steps * self.world_size

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.model.image_size)  # type: ignore[return-value]

    @property
    def target_size(self) -> tuple[int, int]:
        """Size of the auxiliary targets: the first feature map of the backbone at the input size (the priors')."""
        from rock_dist.model.priors import feature_map_sizes

        return tuple(feature_map_sizes(self.model.image_size, self.model.backbone)[0])  # type: ignore[return-value]

    @property
    def model(self) -> ModelConfig:
        if self.model_config is None:
            raise RuntimeError("this run plan has no model (bench plans describe the device only)")
        return self.model_config

    def with_batch_size(self, batch_size: int, origin: BatchOrigin) -> RunPlan:
        """This plan with the batch the `--auto_batch_size` probe found (or a resumed checkpoint's)."""
        return dataclasses.replace(self, batch_size=int(batch_size), batch_origin=origin)

    def with_weights(self, model_config: ModelConfig, meta: Mapping[str, Any], given: Mapping[str, Any],
                     default_names: tuple[Sequence[str], Sequence[str]] = ((), ())) -> RunPlan:
        """This plan with a weights file's architecture, vocabulary (`default_names` where the file has none) and
        post-processing: each setting the flag's value when given (not None), else the saved one, else the
        default (config.resolve_postprocess)."""
        loss = resolve_postprocess(meta.get("postprocess"), **given)
        return dataclasses.replace(
            self, model_config=model_config, postprocess=Postprocess.of(loss),
            class_names=tuple(meta.get("class_names") or default_names[0]),
            scene_types=tuple(meta.get("scene_types") or default_names[1]))


# ---------------------------------------------------------------------------------------------------- builders
def resolve_run_plan(cfg: TrainConfig | EvaluateConfig | DetectConfig | BenchConfig) -> RunPlan:
    """THE resolution of a command's flags into its plan (one call per command; see the module docstring)."""
    world_size, rank = launcher_layout()
    if isinstance(cfg, TrainConfig):
        return _train_plan(cfg, world_size, rank)
    device = resolve_device(cfg.device)
    if isinstance(cfg, EvaluateConfig):
        _check_inference_batch(cfg.batch_size)
        return RunPlan(device=device, precision=resolve_precision(cfg.mixed_precision, device, training=False),
                       world_size=world_size, rank=rank, batch_size=cfg.batch_size)
    if isinstance(cfg, DetectConfig):
        _check_inference_batch(cfg.batch_size)
        return RunPlan(device=device, precision="fp32", batch_size=cfg.batch_size)
    if isinstance(cfg, BenchConfig):
        # The bench's 'auto' precision, compile and batch are its fast recipe's for the device (engine.recipes).
        from rock_dist.engine.recipes import fast_recipe

        fast = fast_recipe(device)
        precision = fast.precision if cfg.precision == "auto" else resolve_precision(
            cfg.precision, device, training=True, flag="--precision")
        return RunPlan(device=device, precision=precision, channels_last=fast.channels_last,
                       compile=fast.compile if cfg.compile == "auto" else cfg.compile == "yes",
                       batch_size=cfg.batch_size or fast.batch_size)
    raise TypeError(f"resolve_run_plan: no plan for {type(cfg).__name__}")


def check_layout(plan: RunPlan, accelerator: Any) -> None:
    """ConfigError when the Accelerator's process group is not the layout the plan was made for (the launcher's
    WORLD_SIZE and RANK): `--multi_gpu` on a machine without CUDA starts N processes that each believe they are
    alone (docs/training.md)."""
    from rock_dist.engine.distributed import check_world_size

    check_world_size(accelerator)
    if (accelerator.num_processes, accelerator.process_index) != (plan.world_size, plan.rank):
        raise ConfigError(f"this process is rank {accelerator.process_index} of {accelerator.num_processes}, but the "
                          f"launcher said rank {plan.rank} of {plan.world_size} (RANK, WORLD_SIZE)")


def _check_inference_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"--batch_size {batch_size}: must be at least 1")


def _train_plan(cfg: TrainConfig, world_size: int, rank: int) -> RunPlan:
    device = resolve_device(cfg.device, cpu_flag=cfg.cpu)
    class_names, scene_types = dataset_vocabulary(cfg.data.train_path)
    model_config = dataclasses.replace(cfg.model, num_classes=len(class_names) + 1, num_scenes=len(scene_types))
    return RunPlan(
        device=device, precision=resolve_precision(cfg.mixed_precision, device, training=True),
        channels_last=on_cuda_by_default(cfg.channels_last, device), compile=on_cuda_by_default(cfg.compile, device),
        world_size=world_size, rank=rank, model_config=model_config, class_names=tuple(class_names),
        scene_types=tuple(scene_types), batch_size=cfg.data.batch_size,
        accumulation_steps=cfg.gradient_accumulation_steps, postprocess=Postprocess.of(cfg.loss))


def dataset_vocabulary(train_path: str) -> tuple[list[str], list[str]]:
    """Class names and scene types from the manifest(s) of the training source(s); all must agree.

    `train_path` is a source string of `rock_dist.data.sources` (split directories, brace patterns, remote shards,
    several as `SRC[:WEIGHT],...`). Sources without any manifest fall back to the fixed vocabularies of
    `rock_dist.data.constants`.
    """
    from rock_dist.data.constants import CLASS_NAMES, SCENE_TYPES
    from rock_dist.data.sources import load_sources
    from rock_dist.errors import DataError

    found: list[tuple[str, list[str], list[str]]] = []
    for source in load_sources(train_path):
        if source.meta.get("class_names") and source.meta.get("scene_types"):
            found.append((source.spec, list(source.meta["class_names"]), list(source.meta["scene_types"])))
    if not found:
        return list(CLASS_NAMES), list(SCENE_TYPES)
    first = found[0]
    for other in found[1:]:
        if other[1:] != first[1:]:
            raise DataError(f"--train_path: sources {other[0]} and {first[0]} have different class or scene lists")
    return first[1], first[2]


# ------------------------------------------------------------------------------------------------ loader specs
def train_loader_spec(plan: RunPlan, data: DataConfig, seed: int,
                      device: torch.device | None = None) -> TrainLoaderSpec:
    """The training stream of this rank, per the plan (sizes, batch, layout) and the data flags; the batched
    augmentation step runs on `device` (the run's own, e.g. cuda:3; None: the plan's device kind)."""
    from rock_dist.data.device_augment import resolve_augment_on
    from rock_dist.data.loader_spec import TrainLoaderSpec

    return TrainLoaderSpec(
        source=data.train_path, image_size=plan.image_size, target_size=plan.target_size,
        batch_size=plan.batch_size, num_workers=data.num_workers, seed=seed, rank=plan.rank,
        world_size=plan.world_size, force_crops=data.force_crops, no_crops=data.no_crops,
        shuffle_buffer=data.shuffle_buffer, color_jitter=data.color_jitter, mode=data.data_mode,
        decode_device=data.decode_device,
        augment_on=resolve_augment_on(data.augment_on, device if device is not None else plan.torch_device,
                                      color_jitter=data.color_jitter, decode_device=data.decode_device))


def eval_loader_spec(plan: RunPlan, split: str, num_workers: int) -> EvalLoaderSpec:
    """The evaluation batches of `split` for this rank, per the plan."""
    from rock_dist.data.loader_spec import EvalLoaderSpec

    return EvalLoaderSpec(source=split, image_size=plan.image_size, target_size=plan.target_size,
                          batch_size=plan.batch_size, num_workers=num_workers, rank=plan.rank,
                          world_size=plan.world_size)


__all__ = ["DeviceKind", "BatchOrigin", "Postprocess", "RunPlan", "resolve_run_plan", "resolve_device", "check_layout",
           "resolve_precision", "cpu_fp16_supported", "on_cuda_by_default", "cpu_forced_by_launcher", "launcher_layout",
           "dataset_vocabulary", "train_loader_spec", "eval_loader_spec"]
