"""`python -m rock_dist.evaluate MODEL_PATH --test_path SPLIT_DIR` — COCO box AP and auxiliary metrics of a model.

Also runs under `accelerate launch -m rock_dist.evaluate ...` (any number of processes, GPUs or CPU with
`ACCELERATE_USE_CPU=1`): every test image is evaluated exactly once across the processes, COCOeval runs once on the
main process, and all processes agree on the result (rock_dist.engine.evaluation). The main process prints the 12
COCO stats, the auxiliary metrics and, with --show_all_cats, per-category AP, and writes ground_truth.json,
detections.json and metrics.json to --coco_json_save_path.

The model comes from a weights file (.pt, or .safetensors with its .json) or a training checkpoint
(rock_dist.engine.checkpoint.load_model); the file stores its architecture, so --no_rock / --aux_tasks only serve as
a check that the file is the expected model. Detections are decoded with the post-processing settings saved with the
weights (docs/weights.md); --score_threshold / --nms_iou / --max_detections override them when given.
"""

from __future__ import annotations

if __name__ == "__main__":  # answer --help before the heavy imports below
    from rock_dist.cli import answer_help_early

    answer_help_early("EvaluateConfig", description=__doc__.splitlines()[0])

import os
from typing import Any, Sequence

import torch

from rock_dist.cli import run_cli
from rock_dist.config import AUX_TASKS, EvaluateConfig, LossConfig, ModelConfig, parse_config, resolve_postprocess
from rock_dist.errors import ConfigError, DataError


def check_model_flags(model_config: ModelConfig, no_rock: bool, aux_tasks: Sequence[str], model_path: str) -> None:
    """ConfigError when --no_rock / --aux_tasks disagree with the architecture stored in the checkpoint."""
    stored = tuple(model_config.tasks)
    if no_rock and stored:
        raise ConfigError(f"{model_path}: --no_rock was given but the checkpoint is a ROCK model with auxiliary "
                          f"tasks {' '.join(stored)}; drop --no_rock")
    if not no_rock and not stored:
        raise ConfigError(f"{model_path}: the checkpoint is a baseline SSD (trained with --no_rock); pass --no_rock")
    if not no_rock:
        requested = tuple(t for t in AUX_TASKS if t in aux_tasks)
        if set(requested) != set(stored):
            raise ConfigError(f"{model_path}: --aux_tasks {' '.join(requested) or '(none)'} but the checkpoint was "
                              f"trained with --aux_tasks {' '.join(stored)}; pass --aux_tasks {' '.join(stored)}")


def describe_postprocess(loss: LossConfig, saved: dict[str, Any], given: dict[str, Any]) -> str:
    """One line saying which post-processing settings run and where each comes from (flag, weights file, default)."""
    def origin(name: str) -> str:
        return "flag" if given.get(name) is not None else "weights" if name in saved else "default"

    labels = {"score_threshold": "score >", "conf_threshold": "score >=", "nms_iou": "NMS IoU",
              "max_detections": "at most"}
    return ", ".join(f"{labels[name]} {getattr(loss, name)} ({origin(name)})" for name in given)


def _cpu_forced() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible and CPU is not forced by the launcher, else 'cpu'; ConfigError for an
    impossible request."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible (use --device cpu or --device auto)")
    if device == "auto":
        # A launch with ACCELERATE_USE_CPU=1 runs gloo on the CPU (docs/training.md); 'auto' must agree with it, or a
        # GPU machine would pick bf16 on CUDA for an Accelerator that is forced onto the CPU.
        return "cuda" if torch.cuda.is_available() and not _cpu_forced() else "cpu"
    return device


def resolve_mixed_precision(choice: str, device: str) -> str:
    """'auto' -> bf16 on a GPU that supports it, else 'no'; fp16 on the CPU is refused."""
    if choice == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if choice == "fp16" and device == "cpu":
        raise ConfigError("--mixed_precision fp16 needs a GPU; on CPU use bf16 or no")
    return choice


def make_accelerator(device: str, mixed_precision: str) -> Any:
    """An Accelerator for inference; CPU is forced when asked, so a CPU multi-process launch uses gloo
    (docs/training.md)."""
    from accelerate import Accelerator

    cpu = device == "cpu" or _cpu_forced()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(EvaluateConfig, argv, description=__doc__.splitlines()[0])
    from rich.console import Console

    from rock_dist.data.manifest import load_manifest
    from rock_dist.data.pipeline import make_eval_loader
    from rock_dist.engine.checkpoint import load_model
    from rock_dist.engine.distributed import check_world_size
    from rock_dist.engine.fast_path import apply_inference_recipe, inference_recipe
    from rock_dist.engine.console import EvalProgress
    from rock_dist.engine.evaluation import evaluate, metrics_renderables
    from rock_dist.model.priors import feature_map_sizes

    device = resolve_device(cfg.device)
    accelerator = make_accelerator(device, resolve_mixed_precision(cfg.mixed_precision, device))
    check_world_size(accelerator)
    console = Console(stderr=False, quiet=not accelerator.is_main_process)

    if cfg.batch_size < 1:
        raise ConfigError(f"--batch_size {cfg.batch_size}: must be at least 1")
    manifest = load_manifest(cfg.test_path)
    model, model_config, meta = load_model(cfg.model_path, accelerator.device)
    check_model_flags(model_config, cfg.no_rock, cfg.aux_tasks, cfg.model_path)
    # Inference only: every conv→BN pair folds exactly in eval mode, one kernel fewer per layer.
    runner = apply_inference_recipe(model, inference_recipe(), accelerator.device).model
    class_names = list(manifest.class_names)
    if len(class_names) != model_config.num_classes - 1:
        raise DataError(f"{cfg.model_path}: the model predicts {model_config.num_classes - 1} classes but "
                        f"{manifest.path} lists {len(class_names)}")
    if meta.get("class_names") and list(meta["class_names"]) != class_names:
        raise DataError(f"{cfg.model_path}: the model was trained on classes {meta['class_names']} but "
                        f"{manifest.path} lists {class_names}")

    given = {name: getattr(cfg, name) for name in ("score_threshold", "nms_iou", "max_detections")}
    loss_config = resolve_postprocess(meta["postprocess"], **given)

    image_size = model_config.image_size
    target_size = feature_map_sizes(image_size, model_config.backbone)[0]
    loader = make_eval_loader(cfg.test_path, image_size=image_size, target_size=target_size,
                              batch_size=cfg.batch_size,
                              num_workers=cfg.num_workers,  # -1 is resolved by the pipeline
                              rank=accelerator.process_index, world_size=accelerator.num_processes)

    console.print(f"[bold]Evaluating[/] {cfg.model_path} ({model_config.backbone}, "
                  f"{'ROCK: ' + ' '.join(model_config.tasks) if model_config.tasks else 'baseline SSD'}, "
                  f"input {image_size[0]}x{image_size[1]}) on {manifest.num_samples} images of {cfg.test_path} "
                  f"with {accelerator.num_processes} process(es) on {accelerator.device}; decoding: "
                  f"{describe_postprocess(loss_config, meta['postprocess'], given)}")

    progress = EvalProgress("evaluating", getattr(loader, "num_samples", None),
                            enabled=not cfg.no_verbose and accelerator.is_main_process)
    with progress:
        metrics = evaluate(runner, loader, accelerator, loss_config=loss_config, out_dir=cfg.coco_json_save_path,
                           show_all_cats=cfg.show_all_cats, class_names=class_names, backend=cfg.coco_backend,
                           progress=progress.advance, expected_images=manifest.num_samples)

    if accelerator.is_main_process:
        for renderable in metrics_renderables(metrics, class_names):
            console.print(renderable)
        console.print(f"AP@[.50:.95] {100 * metrics['AP']:.1f}  AP@.50 {100 * metrics['AP50']:.1f}  "
                      f"({metrics['seconds']:.1f} s, COCOeval backend {metrics['backend']}); JSON written to "
                      f"{cfg.coco_json_save_path}")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    run_cli(main)
