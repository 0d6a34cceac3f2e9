"""The one typed configuration of rock_dist: every command-line flag is a dataclass field here.

Entry points (`rock_dist.train`, `evaluate`, `detect`, `shards`, `bench`) call `parse_config(TheConfig, argv)`;
library code receives the dataclasses, never raw argparse namespaces. Nested dataclasses (e.g. `TrainConfig.model`)
are flattened into one flag namespace, so a field name must be unique across a top-level config. `--help` is built
from the field metadata, so it is always complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

from rock_dist.tasks import catalog

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# The built-in auxiliary tasks, from the torch-free catalog the registry also reads (rock_dist.tasks.catalog).
AUX_TASKS: tuple[str, ...] = catalog.builtin_names()
if TYPE_CHECKING:
    AuxTaskName = str
else:
    # The choices of --aux_tasks: the field types below name this Literal, built from the catalog.
    AuxTaskName = Literal[AUX_TASKS]
BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50")


def opt(help: str, default: Any = dataclasses.MISSING, *, positional: bool = False, cli: bool = True,
        default_factory: Any = dataclasses.MISSING, group: str = "") -> Any:
    """A dataclass field with its command-line help. `cli=False` keeps it off the command line (set from data or
    from a config file); `group` titles its section of `--help` (fields of a nested config share its name)."""
    meta = {"help": help, "positional": positional, "cli": cli, "group": group}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """Architecture and criterion options (docs/architecture.md, docs/losses.md)."""

    backbone: Literal["resnet18", "resnet34", "resnet50"] = opt("Backbone (torchvision ResNet, last stage dilated).",
                                                                 "resnet50")
    pretrained: str = opt("Backbone weights: 'imagenet' (torchvision's, needs them cached or network), 'none', "
                          "or a path to a local state-dict file.", "imagenet")
    backbone_bn: Literal["frozen", "train"] = opt(
        "Backbone BatchNorm: 'frozen' keeps its running statistics fixed while its affine weights train (the "
        "reference; right with pretrained weights), 'train' updates them like any BatchNorm (for a backbone trained "
        "from scratch, e.g. with --pretrained none).", "frozen")
    backbone_stages: Literal[3, 4] = opt(
        "ResNet stages kept: 4 (the reference: layer4 dilated, output stride 16) or 3 (the trunk ends after layer3, "
        "as in NVIDIA's SSD-ResNet: half the channels and, for resnet18 at 128x160, about 40 %% less training "
        "compute, at the same output stride and feature-map sizes; docs/architecture.md).", 4)
    extra_layers: Literal["reference", "light"] = opt(
        "Widths of the SSD head's extra layers: 'reference' (the first one 1024 channels wide, as the reference "
        "builds it) or 'light' (NVIDIA's SSD300 widths, first layer 256 -> 512; docs/architecture.md).",
        "reference")
    no_rock: bool = opt("Train the baseline SSD without the ROCK auxiliary block.", False)
    aux_tasks: tuple[AuxTaskName, ...] = opt(
        f"Auxiliary tasks of the ROCK block (any subset of {' '.join(AUX_TASKS)}).", AUX_TASKS)
    image_size: tuple[int, int] = opt("Network input size as HEIGHT WIDTH.", (480, 640))
    use_all_priors_conf_loss: bool = opt("Confidence loss over all negatives (weighted) instead of 3:1 hard "
                                         "negative mining.", False)
    depth_loss: Literal["smoothl1", "berhu"] = opt("Depth loss on log depth: the reference's SmoothL1 or the "
                                                    "paper's berHu.", "smoothl1")
    # Filled from the shard manifest, not from flags.
    num_classes: int = opt("Detection labels including background.", 20, cli=False)
    num_scenes: int = opt("Scene types.", 27, cli=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        """Auxiliary tasks actually trained, in registry order: none for the baseline SSD. (A task registered at run
        time, not in AUX_TASKS, follows the built-in ones in the order given.)"""
        return () if self.no_rock else tasks_in_order(self.aux_tasks)

    def describe(self) -> str:
        """One line for the consoles: 'resnet18 (3 stages, light extra layers), ROCK: scene depth normals, input
        128x160'; the reference's layout adds nothing after the backbone's name."""
        variants = [f"{self.backbone_stages} stages"] if self.backbone_stages != 4 else []
        if self.extra_layers != "reference":
            variants.append(f"{self.extra_layers} extra layers")
        trunk = self.backbone + (f" ({', '.join(variants)})" if variants else "")
        tasks = "ROCK: " + " ".join(self.tasks) if self.tasks else "baseline SSD"
        return f"{trunk}, {tasks}, input {self.image_size[0]}x{self.image_size[1]}"


def placement_conflict(color_jitter: str, decode_device: str, augment_on: str) -> str | None:
    """Why this combination of --color_jitter, --decode_device and --augment_on (the requested word, or a
    `Placement`'s `where`) cannot work, or None. The one rule table: the flag check (`validate` below) and
    `data.device_augment.resolve_augment_on` (the training stream, the run plan) both ask it."""
    if decode_device == "cuda" and color_jitter == "cpu":
        return ("--decode_device cuda with --color_jitter cpu: the workers have no pixels to jitter when the GPU "
                "decodes; use --color_jitter device")
    if augment_on == "device" and color_jitter == "cpu":
        return ("--augment_on device with --color_jitter cpu: the workers have no resized pixels to jitter; use "
                "--color_jitter device")
    if augment_on == "device" and decode_device == "cuda":
        return ("--augment_on device with --decode_device cuda: the GPU decoder already crops, flips and resizes "
                "the images; use --augment_on workers (or auto)")
    return None


def tasks_in_order(aux_tasks: Sequence[str]) -> tuple[str, ...]:
    """`--aux_tasks` in registry order, whatever order they were given in: the built-in ones (AUX_TASKS) first, then
    tasks registered at run time in the order given; each once."""
    return tuple(t for t in AUX_TASKS if t in aux_tasks) + tuple(
        t for t in dict.fromkeys(aux_tasks) if t not in AUX_TASKS)


@dataclass
class LossConfig:
    """Loss weights and detection post-processing (docs/losses.md, docs/architecture.md)."""

    loc_weight: float = opt("Weight of the SmoothL1 box loss inside the detection loss.", 6.0, cli=False)
    scene_weight: float = opt("Weight of the scene NLL loss.", 3.0, cli=False)
    depth_weight: float = opt("Weight of the depth loss.", 3.0, cli=False)
    normals_weight: float = opt("Weight of the normals loss.", 30.0, cli=False)
    neg_pos_ratio: int = opt("Hard negatives per positive.", 3, cli=False)
    # Post-processing (POSTPROCESS_FIELDS): used by validation during training and saved with the weights, where
    # evaluate, detect and the inference bench read them back (docs/weights.md).
    score_threshold: float = opt("Minimum class score kept when decoding detections for evaluation (saved with the "
                                 "weights).", 0.05)
    nms_iou: float = opt("Per-class NMS IoU threshold (saved with the weights).", 0.3)
    max_detections: int = opt("Detections kept per image (saved with the weights).", 100)
    conf_threshold: float = opt("Minimum score of the detections `rock_dist.detect` draws and lists (saved with the "
                                "weights; evaluation keeps everything above --score_threshold).", 0.4)


# Post-processing settings: LossConfig fields that every weights file stores and evaluate/detect/bench read back.
POSTPROCESS_FIELDS: tuple[str, ...] = ("score_threshold", "nms_iou", "max_detections", "conf_threshold")
_FROM_WEIGHTS = " (default: the value saved with the weights, {} for files without one)"


# ---------------------------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """Where shards are and how batches are made (docs/data_format.md, docs/augmentation.md, docs/data_pipeline.md)."""

    train_path: str = opt("Training shards: a split directory with manifest.json, a brace pattern, 'pipe:' "
                          "commands, or several sources as SRC[:WEIGHT],SRC[:WEIGHT].", "shards/nyuv2/train")
    val_path: str = opt("Validation shards (split directory). 'auto': the val/ split beside a --train_path "
                        "directory when it exists, else none (never the test split: selecting the best model on "
                        "test data would bias the test result). Empty string disables validation.", "auto")
    batch_size: int = opt("Images per process per micro-batch (>= 2: BatchNorm needs it).", 8)
    num_workers: int = opt("Data-loader worker processes per rank (-1: automatic).", -1)
    force_crops: bool = opt("Always apply the SSD random crop (never the 'no crop' option).", False)
    no_crops: bool = opt("Never apply the SSD random crop (flip, colour jitter and resize only): for short runs from "
                         "scratch, where the crop's zoomed views slow learning down.", False)
    data_mode: Literal["auto", "indexed", "stream"] = opt(
        "How the training stream reads shards: 'indexed' (random access by sample: every epoch one seeded "
        "permutation of the whole split, dealt to ranks and workers by sample; any number of ranks and workers on "
        "any number of shards), 'stream' (each worker draws shards with replacement and reads them through a "
        "shuffle buffer: for remote pipe:/http sources and huge sets; epochs are approximate), or 'auto' (indexed "
        "for local shards, stream otherwise). See docs/data_pipeline.md.", "auto")
    shuffle_buffer: int = opt("Sample shuffle buffer per worker in --data_mode stream (raw samples, before "
                              "decoding).", 256)
    check_data: bool = opt("Before training, check every local training split against its manifest and index "
                           "(file sizes, sha256, sample counts and ids, per-sample checksums; no decoding) and stop "
                           "with the list of problems. Without it, damage is found when a sample is read.", False)
    color_jitter: Literal["device", "cpu", "none"] = opt(
        "Where the training colour jitter runs: 'device' (parameters drawn by the loader workers, applied batched "
        "on the training device by the augmentation step), 'cpu' (in the workers) or 'none'.", "device")
    augment_on: Literal["auto", "workers", "device"] = opt(
        "Where the training crop, flip, resize and auxiliary targets are computed: 'workers' (per sample in the "
        "loader workers), 'device' (the workers only decode and draw the random parameters; one batched step on "
        "the training device does the rest, same distribution) or 'auto' (device on CUDA, workers on a CPU, where "
        "the training process shares the workers' cores). See docs/augmentation.md.", "auto")
    decode_device: Literal["cpu", "cuda"] = opt(
        "Where the training JPEGs are decoded: 'cpu' (in the loader workers) or 'cuda' (batched with nvJPEG on the "
        "GPU in the main process, for loader-bound runs with few CPU cores per GPU; falls back to the CPU with a "
        "warning when there is no CUDA device or the GPU cannot decode a batch). See docs/data_pipeline.md.",
        "cpu")


# ------------------------------------------------------------------------------------------------ task weighting
@dataclass
class WeightingConfig:
    """How the auxiliary losses are weighted against detection (docs/losses.md, "Task weighting")."""

    task_weighting: Literal["fixed", "uncertainty", "dwa", "gradnorm"] = opt(
        "Weights of the scene, depth and normals losses: 'fixed' (the reference's 3 / 3 / 30), 'uncertainty' "
        "(learned log-variances, Kendall et al. 2018), 'dwa' (Dynamic Weight Average, Liu et al. 2019) or "
        "'gradnorm' (Chen et al. 2018, on the shared ROCK encoder's last layer). Detection keeps weight 1; every "
        "strategy starts from the reference weights.", "fixed")
    task_weighting_lr: float = opt("Adam learning rate of the uncertainty log-variances and the GradNorm scales.",
                                   0.025)
    dwa_temperature: float = opt("DWA softmax temperature.", 2.0)
    dwa_window: int = opt("DWA: iterations per window whose mean loss stands for the paper's epoch.", 50)
    gradnorm_alpha: float = opt("GradNorm asymmetry alpha (how strongly slower tasks are pushed).", 1.5)


# ---------------------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    """All flags of `python -m rock_dist.train` / `accelerate launch -m rock_dist.train`."""

    data: DataConfig = opt("", default_factory=DataConfig)
    model: ModelConfig = opt("", default_factory=ModelConfig)
    loss: LossConfig = opt("", default_factory=LossConfig)
    weighting: WeightingConfig = opt("", default_factory=WeightingConfig)

    device: Literal["auto", "cuda", "cpu"] = opt("Device; 'auto' picks CUDA when present.", "auto",
                                                 group="precision and performance")
    cpu: bool = opt("Force CPU (same as --device cpu; also makes multi-process launches use gloo).", False,
                    group="precision and performance")
    num_iters: int = opt("Optimizer steps at the global batch.", 30000, group="optimisation")
    lr: float = opt("Adam learning rate.", 5e-5, group="optimisation")
    weight_decay: float = opt("Adam weight decay.", 2e-3, group="optimisation")
    scheduler_milestones: tuple[int, ...] = opt("Global iterations at which the LR is multiplied by gamma.",
                                                (25000,), group="optimisation")
    scheduler_gamma: float = opt("LR decay factor at each milestone.", 0.1, group="optimisation")
    lr_schedule: Literal["step", "linear"] = opt("LR schedule: 'step' multiplies by --scheduler_gamma at each "
                                                 "milestone (the reference); 'linear' decays linearly to zero at "
                                                 "--num_iters (the milestones are then unused).", "step",
                                                 group="optimisation")
    warmup_iters: int = opt("Linear LR warmup over this many first iterations (0: none).", 0, group="optimisation")
    ema_decay: float = opt("Keep an exponential moving average of the weights with this decay (0: off; e.g. "
                           "0.9998): updated after every optimizer step, validated beside the raw weights (val_ema/), "
                           "saved in checkpoints and as weights_final_ema.pt (docs/training.md).", 0.0,
                           group="optimisation")
    precise_bn_batches: int = opt("After the last iteration, recompute the running statistics of the trained "
                                  "BatchNorm layers with the final weights over this many training micro-batches "
                                  "per process (averaged over processes), before the final validation, checkpoint "
                                  "and weights (0: keep the running averages; docs/training.md).", 0,
                                  group="optimisation")
    early_stopping_patience: int = opt("Stop when val AP@[.5:.95] has not improved for this many validations in a "
                                       "row (0: off; needs --val_eval_freq and a val split). Final weights and a "
                                       "checkpoint are written at the stopping iteration.", 0,
                                       group="optimisation")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = opt("Autocast precision; 'auto' = bf16 on GPUs "
                                                                 "that support it, else no.", "auto",
                                                                 group="precision and performance")
    gradient_accumulation_steps: int = opt("Micro-batches per optimizer step.", 1, group="optimisation")
    clip_grad_norm: float = opt("Clip the global gradient norm to this value (0 disables).", 0.0, group="optimisation")
    seed: int = opt("Seed for model init, shard shuffling and augmentation.", 0, group="optimisation")

    report_to: tuple[Literal["tensorboard", "wandb", "mlflow", "none"], ...] = opt(
        "Experiment trackers that get the run's flags, losses, val metrics and pictures, through Accelerate's "
        "tracker API (several allowed; 'none' for no tracker). wandb and mlflow are optional installs: "
        "pip install 'rock_dist[wandb]' or 'rock_dist[mlflow]'.", ("tensorboard",), group="logging and checkpoints")
    writer_path: str = opt("TensorBoard log directory ('auto': SAVE_PATH/tensorboard, so that each run's logs stay "
                           "with its checkpoints; empty disables).", "auto", group="logging and checkpoints")
    tracker_project: str = opt("Project name of the W&B run and experiment name of the MLflow run.", "rock_dist",
                               group="logging and checkpoints")
    mlflow_tracking_uri: str = opt("Where --report_to mlflow logs ('auto': $MLFLOW_TRACKING_URI when set, else a "
                                   "local file store in SAVE_PATH/mlruns).", "auto", group="logging and checkpoints")
    save_path: str = opt("Directory for checkpoints and the final weights.", "checkpoints",
                         group="logging and checkpoints")
    checkpoint_path: str = opt("Checkpoint to resume from: a file, a directory (its newest periodic checkpoint; "
                               "none there: start fresh), or 'auto' (the newest checkpoint in --save_path, fresh "
                               "start if none). Empty: start fresh.", "", group="logging and checkpoints")
    coco_json_save_path: str = opt("Directory for COCO ground-truth/detection JSON of periodic evaluations "
                                   "('auto': SAVE_PATH/coco; empty disables).", "auto", group="logging and checkpoints")
    save_best_on_val: bool = opt("Keep the checkpoint with the best validation AP@[.5:.95].", False,
                                 group="logging and checkpoints")
    val_eval_freq: int = opt("Evaluate on the val split every N iterations (0: only at the end).", 0,
                             group="logging and checkpoints")
    train_eval_freq: int = opt("Log averaged training losses every N iterations.", 50, group="logging and checkpoints")
    image_to_tb_freq: int = opt("Send pictures of predictions (boxes, depth, normals, scene) to the trackers every "
                                "N iterations (0 disables).", 1000, group="logging and checkpoints")
    model_save_freq: int = opt("Save a checkpoint every N iterations (0: only at the end).", 5000,
                               group="logging and checkpoints")
    keep_checkpoints: int = opt("How many periodic checkpoints to keep.", 3, group="logging and checkpoints")
    no_verbose: bool = opt("Quiet console: no progress bar, only warnings and the final summary.", False,
                           group="logging and checkpoints")

    channels_last: Literal["auto", "yes", "no"] = opt("channels_last memory format ('auto': on CUDA).", "auto",
                                                      group="precision and performance")
    compile: Literal["auto", "yes", "no"] = opt("torch.compile the model ('auto': on CUDA).", "auto",
                                                group="precision and performance")
    fold_backbone_bn: bool = opt("Fold the frozen backbone BatchNorms into their convolutions while training "
                                 "(faster; same forward pass, but Adam and weight decay then act on the merged "
                                 "weights, which departs from the reference recipe).", False,
                                 group="precision and performance")
    dist_timeout: int = opt("Seconds a collective may wait for the other ranks before failing (instead of "
                            "hanging).", 1800, group="distributed")
    auto_batch_size: bool = opt("Replace --batch_size by the largest per-process batch that fits on the GPU (90 %% "
                                "of the measured maximum, the smallest over all ranks; a resumed run keeps its "
                                "checkpoint's batch). CUDA only. The learning rate is not rescaled.", False,
                                group="precision and performance")


# ------------------------------------------------------------------------------------------------- evaluate/detect
@dataclass
class EvaluateConfig:
    """Flags of `python -m rock_dist.evaluate`."""

    model_path: str = opt("Checkpoint or final weights file (.pt, or .safetensors with its .json beside it).",
                          positional=True)
    test_path: str = opt("Test shards (split directory).", "shards/nyuv2/test")
    no_rock: bool = opt("Expect a baseline SSD checkpoint (checked against the file).", False)
    aux_tasks: tuple[AuxTaskName, ...] = opt(
        "Auxiliary tasks of the checkpoint (checked against the file).", AUX_TASKS)
    score_threshold: float | None = opt("Minimum class score kept when decoding" + _FROM_WEIGHTS.format(0.05) + ".",
                                        None)
    nms_iou: float | None = opt("Per-class NMS IoU threshold" + _FROM_WEIGHTS.format(0.3) + ".", None)
    max_detections: int | None = opt("Detections kept per image" + _FROM_WEIGHTS.format(100) + ".", None)
    coco_json_save_path: str = opt("Directory for ground-truth, detection and metrics JSON.", "output/eval")
    show_all_cats: bool = opt("Print per-category AP.", False)
    device: Literal["auto", "cuda", "cpu"] = opt("Device; 'auto' picks CUDA when present.", "auto")
    batch_size: int = opt("Images per process per batch.", 16)
    num_workers: int = opt("Data-loader workers per rank (-1: automatic).", -1)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = opt("Autocast precision.", "auto")
    coco_backend: Literal["pycocotools", "faster_coco_eval"] = opt("COCO evaluation implementation.",
                                                                   "pycocotools")
    no_verbose: bool = opt("No progress bar.", False)


@dataclass
class DetectConfig:
    """Flags of `python -m rock_dist.detect`."""

    model_path: str = opt("Checkpoint or final weights file (.pt, or .safetensors with its .json beside it).",
                          positional=True)
    image_path: str = opt("Directory of input images.", "data/detection/images")
    detection_output_path: str = opt("Directory for images with drawn boxes.", "data/detection/output")
    scene_output_path: str = opt("Directory for scene-label pictures (empty: none).", "")
    depth_output_path: str = opt("Directory for colour-mapped depth pictures (empty: none).", "")
    normals_output_path: str = opt("Directory for RGB-coded normals pictures (empty: none).", "")
    conf_threshold: float | None = opt("Score threshold for drawn detections" + _FROM_WEIGHTS.format(0.4) + ".",
                                       None)
    nms_iou: float | None = opt("Per-class NMS IoU threshold" + _FROM_WEIGHTS.format(0.3) + ".", None)
    max_detections: int | None = opt("Detections kept per image" + _FROM_WEIGHTS.format(100) + ".", None)
    picture_min_side: int = opt("Pictures of smaller images are enlarged by a whole factor until their shorter side "
                                "reaches this many pixels, so that the tags stay off the objects (0: never; the "
                                "boxes in the JSON keep the original image's coordinates).", 480)
    no_rock: bool = opt("Expect a baseline SSD checkpoint (checked against the file).", False)
    aux_tasks: tuple[AuxTaskName, ...] = opt(
        "Auxiliary tasks of the checkpoint (checked against the file).", AUX_TASKS)
    device: Literal["auto", "cuda", "cpu"] = opt("Device; 'auto' picks CUDA when present.", "auto")
    batch_size: int = opt("Images per forward pass.", 8)
    get_throughput: bool = opt("Measure end-to-end images/s (decode, model, NMS; device-synchronised).", False)


# ------------------------------------------------------------------------------------------------------ machinery
T = TypeVar("T", bound="DataclassInstance")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _flag_spec(tp: Any, default: Any) -> dict[str, Any]:
    """argparse keyword arguments for one field type."""
    tp, optional = _unwrap_optional(tp)
    origin = get_origin(tp)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction} if default is True else {"action": "store_true"}
    if origin is Literal:
        choices = list(get_args(tp))
        return {"type": type(choices[0]), "choices": choices}
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            spec = _flag_spec(args[0], None)
            spec.pop("action", None)
            return {**spec, "nargs": "*"}
        return {"type": args[0], "nargs": len(args)}
    if tp in (int, float, str):
        return {"type": tp}
    raise TypeError(f"config field type {tp!r} has no command-line form")


def _walk(cls: type, prefix: tuple[str, ...] = (), *, include_hidden: bool = False
          ) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.extend(_walk(tp, prefix + (f.name,), include_hidden=include_hidden))
        elif include_hidden or f.metadata.get("cli", True):
            out.append((prefix + (f.name,), f, tp))
    return out


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


CONFIG_FLAG_HELP = ("YAML or JSON file of flag values (flat, `lr: 0.001`, or nested by section as runs write "
                    "them), or a training run's --save_path (its config.yaml). Flags given on the command line "
                    "override the file.")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None: the help of such a flag says where its value comes from instead."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action) or ""


def build_parser(cls: type, description: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per (nested) field of `cls`, in `--help` sections by concern."""
    if prog is None:
        from rock_dist.invocation import command_name, main_module

        # Under `python -m rock_dist.X` (and its console script) argv[0] is a file path; name the command the way
        # users type it: `python -m rock_dist.X` or `rock-x`.
        module = main_module()
        if module is not None:
            prog = command_name(module)
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip(),
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--config", default="", metavar="FILE_OR_RUN_DIR", help=CONFIG_FLAG_HELP)
    sections: dict[str, Any] = {}
    seen: set[str] = set()
    for path, f, tp in _walk(cls):
        name = path[-1]
        if name in seen or name == "config":
            raise TypeError(f"config field name {name!r} appears twice in {cls.__name__} (or is reserved)")
        seen.add(name)
        title = f.metadata.get("group") or (path[0] if len(path) > 1 else "")
        target = sections.setdefault(title, parser.add_argument_group(title)) if title else parser
        default = _default_of(f)
        spec = _flag_spec(tp, default)
        help_text = f.metadata.get("help", "")
        if f.metadata.get("positional"):
            target.add_argument(name, help=help_text, **{k: v for k, v in spec.items() if k != "action"})
            continue
        if default is not dataclasses.MISSING:
            spec["default"] = list(default) if isinstance(default, tuple) else default
        else:
            spec["required"] = True
        target.add_argument(f"--{name}", dest=name, help=help_text, **spec)
    return parser


def _build(cls: type[T], values: dict[str, Any], hidden: dict[str, Any]) -> T:
    """Instantiate `cls` from parsed flag values and, for fields kept off the command line, `hidden` values."""
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, values, hidden)
        elif f.name in values and f.metadata.get("cli", True):
            value = values[f.name]
            if get_origin(_unwrap_optional(tp)[0]) is tuple and value is not None:
                value = tuple(value)
            kwargs[f.name] = value
        elif f.name in hidden and not f.metadata.get("cli", True):
            kwargs[f.name] = hidden[f.name]
    return cls(**kwargs)


def _config_file_argument(argv: Sequence[str]) -> str:
    """The value of `--config` in `argv` (last one wins, like any flag), found before the real parse: the file's
    values become the parser's defaults, so that the command line overrides them."""
    value = ""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
    return value


def _file_value(tp: Any, value: Any) -> Any:
    """`value` from a config file checked against the field type `tp`; ValueError says what was expected."""
    tp, optional = _unwrap_optional(tp)
    origin = get_origin(tp)
    if value is None and (optional or tp is str):
        return None if optional else ""  # `key:` with nothing after it: the flags' "empty" value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and "yes" in choices and "no" in choices:
            return "yes" if value else "no"  # YAML 1.1 reads a bare yes/no as a boolean
        if value in choices and type(value) is type(choices[0]):
            return value
        raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_file_value(args[0], v) for v in value)
        if len(value) != len(args):
            raise ValueError(f"expected a list of {len(args)} values, got {list(value)!r}")
        return tuple(_file_value(a, v) for a, v in zip(args, value))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    kind = {float: "a number", int: "an integer", str: "a string"}.get(tp, str(tp))
    raise ValueError(f"expected {kind}, got {value!r}")


def _read_config_values(cls: type, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(command-line defaults, values of fields kept off the command line) from the config file `path`."""
    import difflib

    from rock_dist.config_file import read_config_file, resolve_config_path

    raw = read_config_file(path)
    where = resolve_config_path(path)
    fields = {p[-1]: (f, tp) for p, f, tp in _walk(cls, include_hidden=True)}
    defaults: dict[str, Any] = {}
    hidden: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            raise ValueError(f"--config {where}: unknown key {name!r}" + (f" (did you mean {close[0]!r}?)"
                                                                         if close else f" for {cls.__name__}"))
        f, tp = fields[name]
        if f.metadata.get("positional"):
            raise ValueError(f"--config {where}: {name!r} is a positional argument; give it on the command line")
        try:
            checked = _file_value(tp, value)
        except ValueError as err:
            raise ValueError(f"--config {where}: {name!r}: {err}") from None
        if f.metadata.get("cli", True):
            defaults[name] = list(checked) if isinstance(checked, tuple) else checked
        else:
            hidden[name] = checked
    return defaults, hidden


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None,
                 prog: str | None = None) -> T:
    """Parse `argv` (default: sys.argv[1:]) into an instance of the dataclass `cls`, validated.

    `--config FILE` (any command) supplies values for any field; flags on the command line override it.
    `prog` names the command in usage lines (e.g. "python -m rock_dist.shards build"; default: the command as the
    user typed it, see `rock_dist.invocation`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(cls, description, prog)
    hidden: dict[str, Any] = {}
    config_path = _config_file_argument(argv)
    if config_path:
        from rock_dist.config_file import ConfigFileError

        try:
            defaults, hidden = _read_config_values(cls, config_path)
        except ConfigFileError as err:
            parser.error(f"--config {err}")
        except ValueError as err:
            parser.error(str(err))
        parser.set_defaults(**defaults)
    namespace = parser.parse_args(argv)
    config = _build(cls, vars(namespace), hidden)
    try:
        validate(config)
    except ValueError as err:
        parser.error(str(err))
    return config


def validate(config: Any) -> None:
    """Cross-field checks that argparse cannot express; raises ValueError with the flag named."""
    if isinstance(config, QuickstartConfig) and config.compare_weightings and (config.compare or config.no_rock):
        raise ValueError("--compare_weightings trains ROCK four times; it cannot be combined with --compare or "
                         "--no_rock")
    model = getattr(config, "model", None)
    if isinstance(model, ModelConfig):
        h, w = model.image_size
        if h < 64 or w < 64:
            raise ValueError(f"--image_size {h} {w}: both sides must be at least 64 pixels")
        if not model.no_rock and not model.aux_tasks:
            raise ValueError("--aux_tasks is empty: give at least one task, or use --no_rock for the baseline SSD")
    for holder in (config, getattr(config, "loss", None)):
        if holder is not None:
            check_postprocess({name: getattr(holder, name) for name in POSTPROCESS_FIELDS if hasattr(holder, name)})
    data = getattr(config, "data", None)
    if isinstance(data, DataConfig) and data.force_crops and data.no_crops:
        raise ValueError("--force_crops and --no_crops contradict each other")
    if isinstance(data, DataConfig):
        conflict = placement_conflict(data.color_jitter, data.decode_device, data.augment_on)
        if conflict is not None:
            raise ValueError(conflict)
    if isinstance(data, DataConfig) and data.batch_size < 2:
        raise ValueError(f"--batch_size {data.batch_size}: training needs at least 2 images per process "
                         "(BatchNorm on the 1x1 feature map fails with one)")
    if isinstance(config, TrainConfig):
        if config.num_iters < 1:
            raise ValueError(f"--num_iters {config.num_iters}: must be positive")
        if config.gradient_accumulation_steps < 1:
            raise ValueError("--gradient_accumulation_steps must be at least 1")
        if list(config.scheduler_milestones) != sorted(config.scheduler_milestones):
            raise ValueError("--scheduler_milestones must be increasing")
        # Checked here, before any model or data is touched: one line naming the flag instead of a traceback from
        # deep inside the optimizer or the loop.
        weighting = config.weighting
        checks = (("--lr", config.lr, config.lr > 0, "must be positive"),
                  ("--weight_decay", config.weight_decay, config.weight_decay >= 0, "must be 0 or more"),
                  ("--scheduler_gamma", config.scheduler_gamma, config.scheduler_gamma > 0, "must be positive"),
                  ("--clip_grad_norm", config.clip_grad_norm, config.clip_grad_norm >= 0, "must be 0 (off) or more"),
                  ("--keep_checkpoints", config.keep_checkpoints, config.keep_checkpoints >= 1,
                   "must be at least 1"),
                  *((f"--{name}", getattr(config, name), getattr(config, name) >= 0, "must be 0 or more")
                    for name in ("warmup_iters", "val_eval_freq", "train_eval_freq", "image_to_tb_freq",
                                 "model_save_freq", "precise_bn_batches")),
                  ("--task_weighting_lr", weighting.task_weighting_lr, weighting.task_weighting_lr > 0,
                   "must be positive"),
                  ("--dwa_temperature", weighting.dwa_temperature, weighting.dwa_temperature > 0, "must be positive"),
                  ("--dwa_window", weighting.dwa_window, weighting.dwa_window >= 1, "must be at least 1"),
                  ("--gradnorm_alpha", weighting.gradnorm_alpha, weighting.gradnorm_alpha >= 0, "must be 0 or more"))
        for flag, value, ok, rule in checks:
            if not ok or value != value:  # value != value: NaN
                raise ValueError(f"{flag} {value}: {rule}")
        if not 0 <= config.ema_decay < 1 or config.ema_decay != config.ema_decay:
            raise ValueError(f"--ema_decay {config.ema_decay}: must be 0 (off) or more, and below 1")
        if config.early_stopping_patience < 0:
            raise ValueError(f"--early_stopping_patience {config.early_stopping_patience}: must be 0 (off) or more")
        if config.early_stopping_patience and not config.val_eval_freq:
            raise ValueError(f"--early_stopping_patience {config.early_stopping_patience} counts validations during "
                             "training: give --val_eval_freq N as well")
        if "none" in config.report_to and len(set(config.report_to)) > 1:
            raise ValueError(f"--report_to {' '.join(config.report_to)}: 'none' cannot be combined with trackers")
        if weighting.task_weighting != "fixed" and config.model.no_rock:
            raise ValueError(f"--task_weighting {weighting.task_weighting} weights the auxiliary tasks, and --no_rock "
                             "trains none")
        if any(m < 1 for m in config.scheduler_milestones):
            raise ValueError(f"--scheduler_milestones {' '.join(map(str, config.scheduler_milestones))}: "
                             "iterations start at 1")


def check_postprocess(values: dict[str, Any]) -> None:
    """ValueError naming the flag when a post-processing setting (POSTPROCESS_FIELDS; None = not given) is out of
    range. Used for the flags of train/evaluate/detect and for the settings read from a weights file."""
    rules = {"score_threshold": (lambda v: 0 <= v < 1, "must be at least 0 and below 1"),
             "conf_threshold": (lambda v: 0 <= v <= 1, "must be between 0 and 1"),
             "nms_iou": (lambda v: 0 < v <= 1, "must be above 0 and at most 1"),
             "max_detections": (lambda v: float(v).is_integer() and v >= 1, "must be a whole number, at least 1")}
    for name, value in values.items():
        if name not in rules or value is None:
            continue
        ok, rule = rules[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or not ok(value):
            raise ValueError(f"--{name} {value}: {rule}")


def resolve_postprocess(saved: dict[str, Any] | None, **given: Any) -> LossConfig:
    """The post-processing to run, per setting: the flag when the user gave it (not None), else the value saved with
    the weights, else LossConfig's default. Only the POSTPROCESS_FIELDS of the result matter."""
    values = {name: value for name, value in (saved or {}).items() if name in POSTPROCESS_FIELDS}
    values.update({name: value for name, value in given.items() if value is not None})
    if "max_detections" in values:
        values["max_detections"] = int(values["max_detections"])
    return dataclasses.replace(LossConfig(), **values)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-JSON form of a config (for checkpoints and TensorBoard)."""
    return dataclasses.asdict(config)


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Inverse of `to_dict`, tolerant of fields added since the dict was written."""
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        tp = hints[f.name]
        value = values[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            value = from_dict(tp, value)
        elif get_origin(_unwrap_optional(tp)[0]) is tuple and value is not None:
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[f.name] = value
    return cls(**kwargs)


__all__ = [
    "AUX_TASKS", "BACKBONES", "ModelConfig", "LossConfig", "WeightingConfig", "POSTPROCESS_FIELDS", "DataConfig",
    "TrainConfig", "tasks_in_order", "placement_conflict",
    "EvaluateConfig", "DetectConfig", "build_parser", "parse_config", "validate", "check_postprocess",
    "resolve_postprocess", "to_dict", "from_dict", "opt",
]



# ---------------------------------------------------------------------------------------------------- shards
# Owner: data-official. Flags of `python -m rock_dist.shards build|verify` (docs/data_format.md).
@dataclass
class ShardsBuildConfig:
    """Flags of `python -m rock_dist.shards build`: official NYUv2 files -> WebDataset shards + manifests."""

    dataset_path: str = opt("nyu_depth_v2_labeled.mat (MATLAB v7.3 / HDF5).")
    splits_path: str = opt("splits.mat with 1-based trainNdxs/testNdxs (MATLAB v5).")
    normals_path: str = opt("Normals: the normals_gt folder (with normals/ and masks/) or normals_gt.tgz read in "
                            "place. Required unless --no_normals.", "")
    no_normals: bool = opt("Build without normals (the shards then have no normals/mask members).", False)
    val_split_path: str = opt("Optional val_split.txt: scene names whose training images form the val split.", "")
    out: str = opt("Output directory; gets train/ and test/ (and val/) split directories.", "shards/nyuv2")
    dataset_name: str = opt("Dataset name in the manifests and sample-key prefix (letters, digits, '-', '_').",
                            "nyuv2")
    samples_per_shard: int = opt("Samples per tar file (0: automatic, at least 64 shards per split of 16 to 1000 "
                                 "samples each; see docs/data_pipeline.md).", 0)
    shuffle_seed: int = opt("Seed of the random order in which each split's images are dealt to shards (NYUv2 is "
                            "stored scene by scene); -1 keeps the .mat order.", 0)
    num_workers: int = opt("Worker processes, each opening the .mat itself (-1: one per CPU, at most 8).", -1)
    image_format: Literal["jpg", "png"] = opt("Encoding of the RGB member (png is lossless, about 3x larger).",
                                              "jpg")
    jpeg_quality: int = opt("JPEG quality of rgb.jpg.", 95)
    aux_format: Literal["png", "npy"] = opt("Encoding of depth, normals and mask: png (compact) or npy (the same "
                                            "values uncompressed, about 3x larger, faster to read).", "png")
    overwrite: bool = opt("Replace an output directory that holds a different dataset.", False)
    no_progress: bool = opt("No progress bar (for logs and CI).", False)


@dataclass
class ShardsVerifyConfig:
    """Flags of `python -m rock_dist.shards verify`: check shards against their manifests."""

    path: str = opt("A shard output directory (with train/ test/ ...) or one split directory.", positional=True)
    no_decode: bool = opt("Check counts and checksums only, without decoding every member.", False)


__all__ += ["ShardsBuildConfig", "ShardsVerifyConfig"]


# ------------------------------------------------------------------------------------------- create_image_folder
# Owner: evaluation. Flags of `python -m rock_dist.create_image_folder`.
@dataclass
class CreateImageFolderConfig:
    """Flags of `python -m rock_dist.create_image_folder`: export a shard split's RGB images as files."""

    data_path: str = opt("Shard split directory (with manifest.json), e.g. shards/nyuv2/test.",
                         "shards/nyuv2/test")
    save_path: str = opt("Directory the images are written to (created if needed).", "data/detection/images")


__all__ += ["CreateImageFolderConfig"]


# ------------------------------------------------------------------------------------------------------------ rooms
# Owner: rooms. Flags of `python -m rock_dist.synthetic.rooms` (synthetic rooms in the official NYUv2 layout).
@dataclass
class RoomsConfig:
    """Flags of `python -m rock_dist.synthetic.rooms`: render synthetic rooms as official NYUv2 files."""

    out: str = opt("Output directory (gets nyu_depth_v2_labeled.mat, splits.mat, normals_gt/, val_split.txt).")
    num_images: int = opt("Number of images.", 200)
    seed: int = opt("Seed: the same seed and sizes give the same files.", 0)
    height: int = opt("Image height (NYU: 480).", 480)
    width: int = opt("Image width (NYU: 640).", 640)
    images_per_scene: int = opt("Views per scene instance (NYU has about 3).", 3)
    train_fraction: float = opt("Fraction of the scene instances in the training split (NYU: 795 of 1449 images).",
                                0.55)
    class_tint: float = opt("Blend every object of a detection class toward that class's own colour, 0 (natural "
                            "colours, many classes wooden) to 1 (one colour per class).", 0.0)
    scene_types: tuple[str, ...] = opt("Scene types to render (empty: all of bedroom bathroom kitchen living_room "
                                       "office dining_room classroom).", ())
    min_object_area: float = opt("Smallest visible area, as a fraction of the image, that makes an object a detection "
                                 "target; smaller ones keep their label but get no box, like NYU's unannotated "
                                 "fragments (0: the default, 1/3000 of the image and at least 6 pixels).", 0.0)
    camera_distance: float = opt("Metres: the camera stands within this distance of the piece of furniture it "
                                 "films, so objects fill more of the picture (0: anywhere free in the room).", 0.0)
    max_object_area: float = opt("Largest box, as a fraction of the image: a view that one object fills more than "
                                 "this is drawn again (1: keep every view).", 1.0)
    normals_as_tgz: bool = opt("Write normals_gt.tgz instead of a normals_gt folder.", False)
    workers: int = opt("Processes rendering scenes (0: one per CPU core, at most 8). The files do not depend on it.",
                       0)
    quiet: bool = opt("No progress line.", False)


__all__ += ["RoomsConfig"]


# -------------------------------------------------------------------------------------------------- quickstart
# Owner: lead. Flags of `python -m rock_dist.quickstart` (the README's main command).
@dataclass
class QuickstartConfig:
    """Flags of `python -m rock_dist.quickstart`: synthetic rooms (or real NYUv2) → shards → train → evaluate →
    detect."""

    workdir: str = opt("Directory for everything the run writes (files, shards, checkpoints, logs, pictures).",
                       "quickstart")
    nyuv2_dir: str = opt("Use real NYUv2 from this directory (nyu_depth_v2_labeled.mat, splits.mat, normals_gt/ "
                         "or normals_gt.tgz, optional val_split.txt) instead of synthetic rooms.", "")
    num_images: int = opt("Synthetic rooms to render.", 960)
    render_size: tuple[int, int] = opt("Size of the rendered rooms as HEIGHT WIDTH.", (120, 160))
    class_tint: float = opt("Colour tint of the rooms' object classes (see python -m rock_dist.synthetic.rooms "
                            "--help): a from-scratch detector tells tinted classes apart within the CPU budget.", 1.0)
    train_fraction: float = opt("Fraction of the rooms' scenes used for training (the rest is the test set).", 0.75)
    # Easier rooms for a from-scratch detector within the CPU budget (docs/quickstart_experiments.md): at a 128x160
    # input the SSD's coarse maps leave most small objects without a prior at IoU 0.5, so slivers under 3 % of the
    # image get no box and the camera films from nearer (AVX2, 128x160 x 540 iterations, test AP@.5: 5.5-6.3 %
    # -> 9.5 % with 2 %, 2 m -> 12.8 % with 3 %, 1.5 m; priors at IoU >= 0.5 for 37 % -> 60 % of the boxes).
    min_object_area: float = opt("Smallest visible object, as a fraction of the image, that gets a box in the rooms "
                                 "(see python -m rock_dist.synthetic.rooms --help; 0: the renderer's default).", 0.03)
    camera_distance: float = opt("Metres from the camera to the object it films in the rooms (0: anywhere; see "
                                 "python -m rock_dist.synthetic.rooms --help).", 1.5)
    # Close-ups that one object fills (90 of the 240 test views have a box over half the image at 1.5 m) are where
    # the detector is most often confidently wrong. Without them (0.5) the drawn boxes lay on objects more often
    # after ~700 iterations (bf16, Zen 4), but AP fell after 350 (fp32, AVX2) and rendering takes 20 s longer, so
    # the default keeps every view (docs/quickstart_experiments.md, session 5).
    max_object_area: float = opt("Largest box in the rooms, as a fraction of the image: views that one object "
                                 "fills more are drawn again (see python -m rock_dist.synthetic.rooms --help; "
                                 "1: keep every view).", 1.0)
    time_budget: float = opt("End-to-end budget in seconds: the quickstart times a training step on this machine "
                             "and picks the input size and the number of iterations that fit (it prints what it "
                             "chose and why). Ignored with --num_iters.", 540.0)
    num_iters: int = opt("Optimizer steps, exactly (0: as many as --time_budget allows). With --num_iters the "
                         "run is reproducible: input size and batch are the flags below, not measured.", 0)
    image_size: tuple[int, int] = opt("Network input size as HEIGHT WIDTH (0 0: chosen by the time budget; with "
                                      "--num_iters, 240 320). Below about 240x320 the SSD's coarsest maps leave "
                                      "more objects without a prior at IoU 0.5.", (0, 0))
    backbone: Literal["resnet18", "resnet34", "resnet50"] = opt("Backbone of the small configuration.", "resnet18")
    backbone_stages: Literal[3, 4] = opt(
        "ResNet stages kept (see rock_dist.train --help). 3 by default: from scratch on a CPU, resnet18 without "
        "layer4 and with --extra_layers light trains 1.7x faster per step and reached a higher test AP@.5 after the "
        "same 199 iterations (2-core AMD EPYC, AVX2: 6.8 %% vs 4.9 %%; docs/quickstart_experiments.md).", 3)
    extra_layers: Literal["reference", "light"] = opt(
        "Widths of the SSD head's extra layers (see rock_dist.train --help); 'light' by default, see above.",
        "light")
    batch_size: int = opt("Images per process per step (0: the chosen tier's, 8).", 0)
    lr: float = opt("Adam learning rate (higher than the reference's: no pretrained weights here).", 1e-3)
    lr_schedule: Literal["step", "linear"] = opt("LR schedule of the training run (see rock_dist.train --help): "
                                                 "'step' drops it 10x at 80 %% of the iterations.", "step")
    warmup_iters: int = opt("Linear LR warmup iterations of the training run.", 0)
    color_jitter: Literal["none", "device", "cpu"] = opt(
        "Colour jitter of the training run. 'none' by default: the class tint gives each class its own hue, 12-32 "
        "degrees from its neighbours, and the reference's hue jitter (+-18 degrees) would blur exactly that.",
        "none")
    retune: bool = opt("Time every precision / memory format again instead of using this machine's cached "
                       "ranking (without it, only the cached fastest is timed again).", False)
    num_processes: int = opt("Training processes (0: one per GPU, or 1 on CPU).", 0)
    no_rock: bool = opt("Train the baseline SSD instead of ROCK.", False)
    compare: bool = opt("Train the baseline SSD and ROCK with the same budget and print a comparison table.", False)
    task_weighting: Literal["fixed", "uncertainty", "dwa", "gradnorm"] = opt(
        "Auxiliary task weighting of the ROCK run (see rock_dist.train --help).", "fixed")
    compare_weightings: bool = opt("Train ROCK once per task weighting (fixed, uncertainty, dwa, gradnorm) with the "
                                   "same budget and print a table of test metrics and the final weights.", False)
    seed: int = opt("Seed for rendering, shuffling and initialisation.", 0)


__all__ += ["QuickstartConfig"]


# ------------------------------------------------------------------------------------------------------- data bench
@dataclass
class DataBenchConfig:
    """Flags of `python -m rock_dist.perf.data_bench`."""

    shards: str = opt("Training shards (split directory or any source string). Empty: render synthetic 480x640 "
                      "rooms into a temporary directory first.", "")
    num_samples: int = opt("Samples timed per pipeline (after a warm-up of one batch).", 200)
    rounds: int = opt("The pipelines are timed alternately in this many chunks (fair under changing load).", 4)
    batch_size: int = opt("Batch size of both pipelines.", 8)
    image_size: tuple[int, int] = opt("Network input HEIGHT WIDTH.", (480, 640))
    backbone: Literal["resnet18", "resnet34", "resnet50"] = opt(
        "Backbone whose first feature map sets the aux target size.", "resnet50")
    loader_workers: int = opt("Also time our DataLoader with this many worker processes (0: skip).", 0)
    scaling: bool = opt("Also time one rank's DataLoader with 1, 2, 4 and 8 workers on the same samples stored in "
                        "1, 8 and 64 shards (a table).", False)
    seed: int = opt("Seed of both pipelines.", 0)
    json: str = opt("Write the result JSON here (empty: stdout only).", "")


__all__ += ["DataBenchConfig"]


# ------------------------------------------------------------------------------------------------------------ bench
# Owner: performance. Flags of `python -m rock_dist.bench` (issue 6). 0 / "auto" values are resolved per device and
# per --quick by the bench itself, which prints and records what it actually ran.
BENCH_SECTIONS: tuple[str, ...] = ("data", "step", "e2e", "infer", "eval")


@dataclass
class BenchConfig:
    """Flags of `python -m rock_dist.bench`: reference recipe vs rock_dist's fast path, side by side, one run."""

    sections: tuple[str, ...] = opt("Sections to run, comma- or space-separated: data step e2e infer eval.",
                                    BENCH_SECTIONS)
    shards: str = opt("Shard output directory with train/ and test/ (empty: build synthetic shards in a temporary "
                      "directory first; not timed).", "")
    device: Literal["auto", "cuda", "cpu"] = opt("Device; 'auto' picks CUDA when present.", "auto")
    quick: bool = opt("Small and short: resnet18 at 128x160, few repeats (a CPU run takes a few minutes).", False)
    json: str = opt("Write the full report (device, versions, config, every timing) to this JSON file.", "")
    backbone: Literal["auto", "resnet18", "resnet34", "resnet50"] = opt(
        "Backbone ('auto': resnet50, or resnet18 with --quick).", "auto")
    image_size: tuple[int, int] = opt("Network input HEIGHT WIDTH (0 0: 480 640, or 128 160 with --quick).", (0, 0))
    batch_size: int = opt("Batch of the fast recipe (0: 32 on CUDA, 8 on CPU). The reference recipe uses 8.", 0)
    infer_batch_size: int = opt("Batched inference/evaluation batch of the fast recipe (0: the fast batch).", 0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "Autocast precision of the fast recipe ('auto': bf16 where the hardware supports it).", "auto")
    compile: Literal["auto", "yes", "no"] = opt("torch.compile in the fast recipe ('auto': on CUDA only; on CPU "
                                                "compiling takes minutes and was measured slower).", "auto")
    warmup: int = opt("Untimed warm-up iterations per configuration (-1: automatic).", -1)
    repeats: int = opt("Timed windows per configuration; the median is reported (0: automatic).", 0)
    iters: int = opt("Iterations per timed window (0: automatic).", 0)
    data_samples: int = opt("Samples timed per pipeline in the data section (0: automatic).", 0)
    num_images: int = opt("Images of the synthetic dataset when --shards is empty (0: automatic).", 0)
    stored_size: tuple[int, int] = opt("HEIGHT WIDTH of the synthetic dataset's stored images (0 0: 480 640, or "
                                       "96 128 with --quick).", (0, 0))
    nms_load: Literal["trained", "init"] = opt("Inference: 'trained' zeroes the class-score biases so NMS gets "
                                               "trained-model-like work; 'init' keeps the random initialisation.",
                                               "trained")
    find_max_batch: bool = opt("Also search the largest training batch of the fast recipe that fits in GPU memory "
                               "(CUDA only).", False)
    max_batch: int = opt("Upper bound of the largest-batch search.", 512)
    threads: int = opt("torch CPU threads in this process (0: torch's default, one per core). On a machine shared "
                       "with other busy processes, 1 avoids OpenMP threads waiting for each other (measured 10x "
                       "slower steps with 2 threads on 2 busy cores).", 0)
    seed: int = opt("Seed of weights, data and augmentation.", 0)
    work_dir: str = opt("Directory for temporary files (synthetic shards, pickles); empty: the system temp dir.", "")
    weights: str = opt("A weights file or checkpoint whose saved post-processing settings (score threshold, NMS IoU, "
                       "detections per image) the infer and eval sections decode with; the timed model itself stays "
                       "the one described by the flags above (empty: the defaults).", "")


__all__ += ["BENCH_SECTIONS", "BenchConfig"]


# ------------------------------------------------------------------------------------------------------------ export
@dataclass
class ExportConfig:
    """Flags of `python -m rock_dist.export`: a weights file or checkpoint as an ONNX graph for deployment."""

    model_path: str = opt("Weights file or checkpoint (.pt, or .safetensors with its .json beside it).",
                          positional=True)
    format: Literal["onnx"] = opt("Output format.", "onnx")
    out: str = opt("Output file (empty: the weights path with the format's suffix, e.g. weights_final.onnx).", "")
    opset: int = opt("ONNX operator set version (18 or later: torch's exporter has no implementations below).", 18)
    check: bool = opt("Run the exported graph with onnxruntime on a random batch and compare it with PyTorch "
                      "(needs onnxruntime).", True)


__all__ += ["ExportConfig"]
