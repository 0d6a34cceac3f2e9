"""The README's main command: the whole system on an embedded default, in minutes on a laptop CPU.

`python -m rock_dist.quickstart` renders learnable synthetic rooms in the official NYUv2 layout (or takes real
NYUv2 files with `--nyuv2_dir`), shards them with the real builder, times a training step on this machine and sizes
the run to `--time_budget` (`rock_dist.quickstart_plan`, `perf.autotune`), trains a small ROCK configuration through
`accelerate launch -m rock_dist.train` (CPU or every GPU present), evaluates it with COCO metrics, exports the test
images and draws detections on them, then prints where everything is. Each step runs the same command a user would
type, in a subprocess, so the quickstart exercises exactly the public entry points. `--compare` trains the baseline
SSD and ROCK with the same budget and prints the table the README shows.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from rock_dist.cli import run_cli
from rock_dist.config import QuickstartConfig, parse_config
from rock_dist.errors import ConfigError, RockError
from rock_dist.invocation import command_name

# Logs and pipes get 132 columns (Rich's 80 would cut the comparison tables' names short); terminals their own width.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 132)
_STEP_SECONDS: dict[str, float] = {}  # wall time of each step of this run, for the closing summary


@dataclass
class OfficialFiles:
    dataset: Path
    splits: Path
    normals: Path
    val_split: Path | None


@dataclass(frozen=True)
class ResolvedRun:
    """What every trained configuration of this quickstart uses: input, batch, iterations, speed flags."""

    image_size: tuple[int, int]
    batch_size: int
    num_iters: int
    speed_flags: tuple[str, ...]


@dataclass
class RunOutputs:
    """Where one trained configuration left its results."""

    name: str
    weights: Path
    checkpoints: Path
    metrics: Path
    tensorboard: Path
    train_seconds: float
    task_weighting: str = "fixed"


def _run(step: str, args: Sequence[str], env: dict[str, str] | None = None) -> float:
    """Run one public command, streaming its output; a failure stops the quickstart naming the step."""
    console.rule(f"[bold]{step}")
    console.print(f"$ {shlex.join(args)}", style="dim")
    start = time.perf_counter()
    result = subprocess.run(list(args), env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RockError(f"quickstart step '{step}' failed with exit status {result.returncode} "
                        f"(command: {shlex.join(args)})")
    seconds = time.perf_counter() - start
    _STEP_SECONDS[step] = seconds
    return seconds


def _official_files(directory: Path) -> OfficialFiles:
    """The official NYUv2 files in `directory`; ConfigError listing what is missing."""
    dataset = directory / "nyu_depth_v2_labeled.mat"
    splits = directory / "splits.mat"
    normals = next((p for p in (directory / "normals_gt", directory / "normals_gt.tgz") if p.exists()), None)
    missing = [str(p) for p in (dataset, splits) if not p.exists()]
    if normals is None:
        missing.append(str(directory / "normals_gt") + " (or normals_gt.tgz)")
    if missing or normals is None:  # (normals is None only with a non-empty `missing`)
        raise ConfigError(f"--nyuv2_dir {directory}: missing {', '.join(missing)}")
    val_split = directory / "val_split.txt"
    return OfficialFiles(dataset, splits, normals, val_split if val_split.exists() else None)


def _launcher(num_processes: int) -> list[str]:
    """`accelerate launch` arguments for this machine: every GPU, or one CPU process."""
    import torch

    gpus = torch.cuda.device_count()
    # Precision and compilation are rock_dist.train's own flags; telling the launcher 'no' keeps one source of truth
    # (and silences its warnings about defaults).
    quiet = ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return ["accelerate", "launch", *quiet, *_layout(gpus, num_processes)]


def _layout(gpus: int, num_processes: int) -> list[str]:
    if gpus == 0:
        if num_processes > 1:
            # `--cpu --num_processes N` starts one process; N CPU processes need --multi_gpu + forced CPU
            # (docs/training.md).
            return ["--multi_gpu", "--num_machines", "1", "--num_processes", str(num_processes), "-m",
                    "rock_dist.train", "--cpu"]
        threads = str(os.cpu_count() or 1)
        return ["--cpu", "--num_machines", "1", "--num_processes", "1", "--num_cpu_threads_per_process", threads,
                "-m", "rock_dist.train"]
    n = num_processes or gpus
    multi = ["--multi_gpu"] if n > 1 else []
    return [*multi, "--num_machines", "1", "--num_processes", str(n), "-m", "rock_dist.train"]


def _train_and_evaluate(cfg: QuickstartConfig, run: ResolvedRun, name: str, no_rock: bool, shards: Path,
                        work: Path, task_weighting: str = "fixed") -> RunOutputs:
    from rock_dist.quickstart_plan import PRECISE_BN_BATCHES

    run_dir = work / "runs" / name
    checkpoints = run_dir / "checkpoints"
    tensorboard = run_dir / "tensorboard"
    eval_dir = run_dir / "eval"
    h, w = run.image_size
    num_iters = run.num_iters
    # No pretrained weights here, so the backbone's BatchNorms must learn their statistics (frozen initial ones
    # would leave the trunk unnormalised); real NYUv2 runs with ImageNet weights keep the reference's frozen BN.
    # From scratch, the reference's all-priors confidence loss separates objects from background sooner than hard
    # negative mining, whose 3 negatives per positive are mostly near misses of the same object (rooms, 500
    # iterations: AP@.5 5.2 % → 6.3 %, objects' mean background probability 0.75 → 0.33); and a few hundred
    # iterations are too few for the SSD crop's zoomed views to pay off (650 iterations: AP@.5 6.9 % → 10.3 %
    # without crops; flips and colour jitter stay).
    model_flags = ["--backbone", cfg.backbone, "--backbone_stages", str(cfg.backbone_stages), "--extra_layers",
                   cfg.extra_layers, "--pretrained", "none", "--backbone_bn", "train",
                   "--image_size", str(h), str(w), "--use_all_priors_conf_loss", "--no_crops", "--color_jitter",
                   cfg.color_jitter, *run.speed_flags]
    if no_rock:
        model_flags.append("--no_rock")
    else:
        # DWA's windows stand for the paper's epochs: about ten of them over the run.
        model_flags += ["--task_weighting", task_weighting, "--dwa_window", str(max(num_iters // 10, 1))]
    env = {"ACCELERATE_USE_CPU": "1"} if cfg.num_processes > 1 and not _has_cuda() else None
    seconds = _run(f"train {name}", [
        *_launcher(cfg.num_processes), "--train_path", str(shards / "train"), "--val_path", str(shards / "val"),
        *model_flags, "--num_iters", str(num_iters), "--batch_size", str(run.batch_size), "--lr", str(cfg.lr),
        "--scheduler_milestones", str(max(int(num_iters * 0.8), 1)), "--lr_schedule", cfg.lr_schedule,
        "--warmup_iters", str(cfg.warmup_iters), "--seed", str(cfg.seed),
        "--save_path", str(checkpoints), "--writer_path", str(tensorboard),
        "--coco_json_save_path", str(run_dir / "val_coco"), "--val_eval_freq", "0",
        "--model_save_freq", str(max(num_iters // 2, 1)), "--image_to_tb_freq", str(max(num_iters // 3, 1)),
        "--train_eval_freq", "10", "--precise_bn_batches", str(PRECISE_BN_BATCHES),
    ], env)
    weights = checkpoints / "weights_final.pt"
    eval_flags = ["--no_rock"] if no_rock else []
    _run(f"evaluate {name}", [sys.executable, "-m", "rock_dist.evaluate", str(weights), "--test_path",
                              str(shards / "test"), "--coco_json_save_path", str(eval_dir), *eval_flags])
    return RunOutputs(name, weights, checkpoints, eval_dir / "metrics.json", tensorboard, seconds, task_weighting)


def _tier_model_config(cfg: QuickstartConfig, image_size: tuple[int, int]) -> Any:
    from rock_dist.config import ModelConfig

    return ModelConfig(backbone=cfg.backbone, backbone_stages=cfg.backbone_stages, extra_layers=cfg.extra_layers,
                       pretrained="none", backbone_bn="train", image_size=image_size,
                       use_all_priors_conf_loss=True, no_rock=cfg.no_rock and not cfg.compare)


def _autotune(cfg: QuickstartConfig, image_size: tuple[int, int], batch_size: int, only: Any = None,
              need_time: bool = True) -> Any:
    """The fastest precision / memory format for this tier on this machine, and its step time (cached; the
    cached winner timed again when `need_time`, as the budget's plan needs today's time). `only`: time just these
    candidates (a cheaper tier after the first, whose ranking it inherits)."""
    import torch

    from rock_dist.config import LossConfig
    from rock_dist.perf.autotune import autotune_training_step

    device = torch.device("cuda" if _has_cuda() else "cpu")
    console.print(f"timing a training step at {image_size[0]}x{image_size[1]}, batch {batch_size}, on {device}...",
                  style="dim")
    result = autotune_training_step(_tier_model_config(cfg, image_size), LossConfig(), batch_size, device,
                                    refresh=cfg.retune, retime_best=need_time, only=only, log=console.print)
    timings = ", ".join(f"{label} {seconds:.2f} s" for label, seconds in result.seconds.items())
    source = ("cached ranking, fastest timed again now" if result.retimed else
              "cached" if result.cached else "measured")
    console.print(f"  step times ({source}): {timings}; fastest: {result.best.label}")
    return result


def _speed_flags(best: Any) -> tuple[str, ...]:
    """The train flags of the autotune's fastest candidate on a CPU; on CUDA the train command's own defaults
    (bf16, channels_last) are the fast path already."""
    return () if _has_cuda() else tuple(best.train_flags())


def resolve_run(cfg: QuickstartConfig, deadline: float, eval_images: int) -> ResolvedRun:
    """Input size, batch and iterations: exactly the flags with --num_iters, else sized to the time budget."""
    from rock_dist.quickstart_plan import TIERS, plan_training

    requested = cfg.image_size if cfg.image_size != (0, 0) else None
    if cfg.num_iters > 0:
        size = requested or TIERS[0].image_size
        batch = cfg.batch_size or TIERS[0].batch_size
        best = _autotune(cfg, size, batch, need_time=False).best  # an exact run needs the flags, not the time
        console.print(f"[bold]plan[/]: --num_iters {cfg.num_iters} at {size[0]}x{size[1]}, batch {batch}, "
                      f"{best.label} (exact run; --time_budget not used)")
        return ResolvedRun(size, batch, cfg.num_iters, _speed_flags(best))
    tiers = TIERS
    if requested or cfg.batch_size:  # one tier: the requested size / batch, with the iteration range of its tier
        import dataclasses

        base = next((t for t in TIERS if t.image_size == requested), TIERS[0])
        tiers = (dataclasses.replace(base, name="requested", image_size=requested or base.image_size,
                                     batch_size=cfg.batch_size or base.batch_size),)
    tuned: dict[str, Any] = {}

    def step_seconds(tier: Any) -> float:
        # The precision / memory-format ranking is a property of the CPU: the first tier timed (the cheapest)
        # ranks every candidate, and the dearer tiers are timed with its winner alone.
        first = next(iter(tuned.values()), None)
        tuned[tier.name] = _autotune(cfg, tier.image_size, tier.batch_size, only=[first.best] if first else None)
        return tuned[tier.name].best_seconds

    plan = plan_training(tiers, step_seconds, deadline, eval_images=eval_images)
    console.print(f"[bold]plan[/]: {plan.tier.name}, {plan.num_iters} iterations, {tuned[plan.tier.name].best.label}"
                  f" — {plan.reason}")
    return ResolvedRun(plan.tier.image_size, plan.tier.batch_size, plan.num_iters,
                       _speed_flags(tuned[plan.tier.name].best))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _metrics(path: Path) -> dict[str, float]:
    return json.loads(path.read_text())


def _picture_check(run: RunOutputs) -> Any:
    """What the drawn boxes of `run` get right, from its test evaluation (`engine.picture_check`) at the drawing
    threshold its weights carry."""
    from rock_dist.engine.picture_check import check_evaluation_dir
    from rock_dist.engine.weights import portable_paths

    description = json.loads(portable_paths(run.weights)[1].read_text())
    return check_evaluation_dir(run.metrics.parent, float(description["postprocess"]["conf_threshold"]))


def _final_task_weights(run: RunOutputs) -> dict[str, float]:
    """The auxiliary weights a run ended with (its last checkpoint's task-weighting state)."""
    from rock_dist.config import LossConfig
    from rock_dist.engine import checkpoint as ckpt
    from rock_dist.engine.normalization import reference_weights
    from rock_dist.engine.task_weighting import build_task_weighting

    step, path = max(ckpt.periodic_checkpoints(run.checkpoints))
    state = ckpt.read_checkpoint(path).get("task_weighting") or {"name": "fixed"}
    tasks = ("scene", "depth", "normals")
    weighting = build_task_weighting(state["name"], tasks, reference_weights(LossConfig()))
    weighting.load_state_dict(state)
    return weighting.weights()


def _cell(metrics: dict[str, float], key: str, scale: float = 1.0, digits: int = 1) -> str:
    value = metrics.get(key)
    return "—" if value is None else f"{value * scale:.{digits}f}"


def _comparison_table(runs: Sequence[RunOutputs], title: str, weights: bool = False) -> Table:
    table = Table(title=title)
    columns = ["model", "AP@[.5:.95]", "AP@.5", "scene acc", "depth abs-rel", "normals mean°", "train s"]
    for column in columns + (["final w scene / depth / normals"] if weights else []):
        # Names and weights whole; the numeric headers may wrap on a narrow console.
        table.add_column(column, justify="right" if column != "model" else "left",
                         no_wrap=column == "model" or column.startswith("final"))
    for run in runs:
        m = _metrics(run.metrics)
        row = [run.name, _cell(m, "AP", 100), _cell(m, "AP50", 100), _cell(m, "scene_accuracy", 100),
               _cell(m, "depth_abs_rel", 1, 3), _cell(m, "normals_mean"), f"{run.train_seconds:.0f}"]
        if weights:
            final = _final_task_weights(run)
            row.append(" / ".join(f"{final[t]:.3g}" for t in ("scene", "depth", "normals")))
        table.add_row(*row)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(QuickstartConfig, argv, prog=command_name("rock_dist.quickstart"))
    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    if cfg.nyuv2_dir:
        files = _official_files(Path(cfg.nyuv2_dir))
    else:
        rooms = work / "rooms"
        rh, rw = cfg.render_size
        _run("render synthetic rooms", [sys.executable, "-m", "rock_dist.synthetic.rooms", "--out", str(rooms),
                                        "--num_images", str(cfg.num_images), "--seed", str(cfg.seed),
                                        "--height", str(rh), "--width", str(rw), "--class_tint", str(cfg.class_tint),
                                        "--train_fraction", str(cfg.train_fraction),
                                        "--min_object_area", str(cfg.min_object_area),
                                        "--camera_distance", str(cfg.camera_distance),
                                        "--max_object_area", str(cfg.max_object_area)])
        files = _official_files(rooms)

    shards = work / "shards"
    build = [sys.executable, "-m", "rock_dist.shards", "build", "--dataset_path", str(files.dataset),
             "--splits_path", str(files.splits), "--normals_path", str(files.normals), "--out", str(shards),
             "--samples_per_shard", "32"]
    if files.val_split is not None:
        build += ["--val_split_path", str(files.val_split)]
    _run("build shards", build)
    if not (shards / "val").exists():
        raise ConfigError(f"{shards}: no val split was built; give val_split.txt next to the NYUv2 files")

    from rock_dist.data.manifest import load_manifest

    if cfg.compare_weightings:
        variants = [(f"rock {w}", False, w) for w in ("fixed", "uncertainty", "dwa", "gradnorm")]
    elif cfg.compare:
        variants = [("ssd", True, "fixed"), ("rock", False, cfg.task_weighting)]
    else:
        variants = [("ssd" if cfg.no_rock else "rock", cfg.no_rock, cfg.task_weighting)]
    # The budget covers one training; the comparisons train each variant with the same plan (2x or 4x the time).
    eval_images = load_manifest(shards / "val").num_samples + 2 * load_manifest(shards / "test").num_samples
    run = resolve_run(cfg, start + cfg.time_budget, eval_images)
    runs = [_train_and_evaluate(cfg, run, name.replace(" ", "_"), no_rock, shards, work, weighting)
            for name, no_rock, weighting in variants]
    main_run = runs[0] if cfg.compare_weightings else runs[-1]

    images = work / "test_images"
    pictures = work / "detections"
    _run("export test images", [sys.executable, "-m", "rock_dist.create_image_folder", "--data_path",
                                str(shards / "test"), "--save_path", str(images)])
    detect = [sys.executable, "-m", "rock_dist.detect", str(main_run.weights), "--image_path", str(images),
              "--detection_output_path", str(pictures / "boxes")]
    if main_run.name.startswith("rock"):
        detect += ["--scene_output_path", str(pictures / "scene"), "--depth_output_path", str(pictures / "depth"),
                   "--normals_output_path", str(pictures / "normals")]
    else:
        detect += ["--no_rock"]
    _run("draw detections", detect)

    console.rule("[bold green]done")
    if cfg.compare_weightings:
        console.print(_comparison_table(runs, "ROCK task weightings, same budget", weights=True))
    elif cfg.compare:
        console.print(_comparison_table(runs, "baseline SSD vs ROCK, same budget"))
    m = _metrics(main_run.metrics)
    total = time.perf_counter() - start
    budget = "" if cfg.num_iters > 0 else f" (budget {cfg.time_budget:.0f} s)"
    console.print(f"test AP@[.5:.95] {100 * m['AP']:.1f}   AP@.5 {100 * m['AP50']:.1f}   "
                  f"({m.get('num_images', '?')} images)   total {total:.0f} s{budget}")
    console.print("time per step: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in _STEP_SECONDS.items()))
    console.print(_picture_check(main_run).describe())
    console.print(f"checkpoint   {main_run.weights}  (resumable checkpoints in {main_run.checkpoints})")
    console.print(f"metrics      {main_run.metrics}")
    console.print(f"tensorboard  tensorboard --logdir {main_run.tensorboard}")
    console.print(f"pictures     {pictures}")
    return 0


if __name__ == "__main__":
    run_cli(main)
