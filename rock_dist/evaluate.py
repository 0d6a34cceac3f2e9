"""`python -m rock_dist.evaluate MODEL_PATH --test_path SPLIT_DIR` — COCO box AP and auxiliary metrics of a model.

Also runs under `accelerate launch -m rock_dist.evaluate ...` (any number of processes, GPUs or CPU with
`ACCELERATE_USE_CPU=1`): every test image is evaluated exactly once across the processes, COCOeval runs once on the
main process, and all processes agree on the result (rock_dist.engine.evaluation). The main process prints the 12
COCO stats, the auxiliary metrics and, with --show_all_cats, per-category AP, and writes ground_truth.json,
detections.json and metrics.json to --coco_json_save_path.

The model comes from a weights file (.pt, or .safetensors with its .json) or a training checkpoint
(rock_dist.engine.checkpoint.load_model); the file stores its architecture, so --no_rock / --aux_tasks only serve as
a check that the file is the expected model. Detections are decoded with the post-processing settings saved with the
weights (docs/weights.md); --score_threshold / --nms_iou / --max_detections override them when given. Device,
precision, batch and post-processing come from the run plan (`engine.run_plan`, completed by the weights file in
`load_for_inference`, which `rock_dist.detect` shares).
"""

from __future__ import annotations

if __name__ == "__main__":  # answer --help before the heavy imports below
    from rock_dist.cli import answer_help_early

    answer_help_early("EvaluateConfig", description=__doc__.splitlines()[0])

from typing import TYPE_CHECKING, Any, Sequence

import torch

from rock_dist.cli import run_cli
from rock_dist.config import EvaluateConfig, ModelConfig, parse_config, tasks_in_order
from rock_dist.errors import ConfigError, DataError

if TYPE_CHECKING:
    from rock_dist.engine.run_plan import Postprocess, RunPlan


def check_model_flags(model_config: ModelConfig, no_rock: bool, aux_tasks: Sequence[str], model_path: str) -> None:
    """ConfigError when --no_rock / --aux_tasks disagree with the architecture stored in the checkpoint."""
    stored = tuple(model_config.tasks)
    if no_rock and stored:
        raise ConfigError(f"{model_path}: --no_rock was given but the checkpoint is a ROCK model with auxiliary "
                          f"tasks {' '.join(stored)}; drop --no_rock")
    if not no_rock and not stored:
        raise ConfigError(f"{model_path}: the checkpoint is a baseline SSD (trained with --no_rock); pass --no_rock")
    if not no_rock:
        requested = tasks_in_order(aux_tasks)  # tasks registered at run time included
        if set(requested) != set(stored):
            raise ConfigError(f"{model_path}: --aux_tasks {' '.join(requested) or '(none)'} but the checkpoint was "
                              f"trained with --aux_tasks {' '.join(stored)}; pass --aux_tasks {' '.join(stored)}")


def describe_postprocess(post: Postprocess, saved: dict[str, Any], given: dict[str, Any]) -> str:
    """One line saying which post-processing settings run and where each comes from (flag, weights file, default)."""
    def origin(name: str) -> str:
        return "flag" if given.get(name) is not None else "weights" if name in saved else "default"

    labels = {"score_threshold": "score >", "conf_threshold": "score >=", "nms_iou": "NMS IoU",
              "max_detections": "at most"}
    return ", ".join(f"{labels[name]} {getattr(post, name)} ({origin(name)})" for name in given)


def load_for_inference(plan: RunPlan, device: torch.device, model_path: str, *, no_rock: bool,
                       aux_tasks: Sequence[str], given: dict[str, Any]
                       ) -> tuple[RunPlan, torch.nn.Module, dict[str, Any]]:
    """Load the weights file for evaluate and detect: (the plan completed with the file's architecture, vocabulary
    and post-processing (`given` flags win), the model set up for inference on `device` (the plan's, with this
    process's GPU index), the file's meta). --no_rock / --aux_tasks are checked against the file."""
    from rock_dist.data.constants import CLASS_NAMES, SCENE_TYPES
    from rock_dist.engine.checkpoint import load_model
    from rock_dist.engine.fast_path import apply_inference_recipe, inference_recipe

    model, model_config, meta = load_model(model_path, device)
    check_model_flags(model_config, no_rock, aux_tasks, model_path)
    plan = plan.with_weights(model_config, meta, given, default_names=(CLASS_NAMES, SCENE_TYPES))
    # Inference only: every conv→BN pair folds exactly in eval mode, one kernel fewer per layer.
    return plan, apply_inference_recipe(model, inference_recipe(), device).model, meta


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(EvaluateConfig, argv, description=__doc__.splitlines()[0])
    from rich.console import Console

    from rock_dist.data.manifest import load_manifest
    from rock_dist.data.pipeline import make_eval_loader
    from rock_dist.engine.console import EvalProgress
    from rock_dist.engine.evaluation import evaluate, metrics_renderables
    from rock_dist.engine.run_plan import check_layout, eval_loader_spec, resolve_run_plan
    from rock_dist.engine.runtime import inference_accelerator

    plan = resolve_run_plan(cfg)
    accelerator = inference_accelerator(plan)
    check_layout(plan, accelerator)
    console = Console(stderr=False, quiet=not accelerator.is_main_process)

    manifest = load_manifest(cfg.test_path)
    given = {name: getattr(cfg, name) for name in ("score_threshold", "nms_iou", "max_detections")}
    plan, runner, meta = load_for_inference(plan, accelerator.device, cfg.model_path, no_rock=cfg.no_rock,
                                            aux_tasks=cfg.aux_tasks, given=given)
    model_config = plan.model
    class_names = list(manifest.class_names)
    if len(class_names) != model_config.num_classes - 1:
        raise DataError(f"{cfg.model_path}: the model predicts {model_config.num_classes - 1} classes but "
                        f"{manifest.path} lists {len(class_names)}")
    if meta.get("class_names") and list(meta["class_names"]) != class_names:
        raise DataError(f"{cfg.model_path}: the model was trained on classes {meta['class_names']} but "
                        f"{manifest.path} lists {class_names}")

    loss_config = plan.postprocess.loss_config()
    loader = make_eval_loader(eval_loader_spec(plan, cfg.test_path, cfg.num_workers))  # -1: the pipeline's choice

    console.print(f"[bold]Evaluating[/] {cfg.model_path} ({model_config.describe()}) on {manifest.num_samples} "
                  f"images of {cfg.test_path} "
                  f"with {accelerator.num_processes} process(es) on {accelerator.device}; decoding: "
                  f"{describe_postprocess(plan.postprocess, meta['postprocess'], given)}")

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
