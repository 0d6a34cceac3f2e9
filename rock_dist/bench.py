"""`python -m rock_dist.bench`: the reference recipe vs rock_dist's fast path, measured side by side in one run.

    python -m rock_dist.bench [--sections data,step,e2e,infer,eval] [--shards DIR] [--device auto] [--quick]
                              [--json out.json] [--find_max_batch] ...

Sections (each on whatever device is present; the recipes are defined in `rock_dist.perf.recipes` and applied by
the engine's fast path, `rock_dist.engine.fast_path`):
- data: samples/s per worker of our shard reader vs a reference-style pickle + PIL + CPU-matching pipeline
  (`perf.data_bench.run_data_benchmark`, one thread each);
- step: training img/s of the trainer's own step (`engine.step.train_step`) on an in-memory batch, one row per
  change from the reference recipe to the fast one (batched matching, batch size, bf16, channels_last, BN folding,
  fused Adam, compile);
- e2e: training img/s from the shards, the same step fed by a loader: reference recipe on the reference-style
  loader, the reference step on the trainer's loader, and the fast recipe on the trainer's loader;
- infer: inference img/s including decoding and NMS, batch 1 and batched, per inference-relevant change;
- eval: wall time of `engine.evaluation.evaluate` over the test split.
Warm-up iterations are excluded, the device is synchronised around every timed window, the median of the windows
is reported; peak GPU memory per configuration on CUDA (process RSS on a CPU). The table goes to the terminal, the
full report (device, versions, resolved configuration, every window's timing) to `--json`.

Without `--shards`, a synthetic NYUv2 look-alike is generated and sharded into a temporary directory first (not
timed). `--quick` shrinks the model and the repeats so that a CPU run takes a few minutes; whatever runs, the
report states the backbone, input size and batch sizes it used.
"""

from __future__ import annotations

if __name__ == "__main__":  # answer --help before the heavy imports below
    from rock_dist.cli import answer_help_early
    from rock_dist.invocation import command_name

    answer_help_early("BenchConfig", prog=command_name("rock_dist.bench"))

import dataclasses
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from rock_dist.cli import run_cli
from rock_dist.config import BENCH_SECTIONS, BenchConfig, ModelConfig, parse_config, to_dict
from rock_dist.errors import ConfigError, RockError
from rock_dist.fsutil import atomic_write_json
from rock_dist.invocation import command_name, command_words
from rock_dist.engine import memory
from rock_dist.engine.fast_path import Precision
from rock_dist.perf import report
from rock_dist.perf.infer_bench import saved_postprocess
from rock_dist.perf.recipes import Recipe, ladder


@dataclasses.dataclass
class Settings:
    """BenchConfig with every 'auto' resolved for this device (recorded in the JSON as `meta.settings`)."""

    sections: list[str]
    device: torch.device
    backbone: Literal["resnet18", "resnet34", "resnet50"]
    image_size: tuple[int, int]
    batch_size: int
    infer_batch_size: int
    precision: Precision  # the run plan's ('auto': the fast recipe's choice for the device)
    compile: bool
    warmup: int
    repeats: int
    iters: int
    data_samples: int
    num_images: int
    stored_size: tuple[int, int]


def resolve_settings(cfg: BenchConfig) -> Settings:
    """Resolve the 'auto' (0 / -1) flags of `cfg` for the device and --quick; ConfigError for impossible ones."""
    sections = [s for item in cfg.sections for s in item.replace(",", " ").split()]
    unknown = [s for s in sections if s not in BENCH_SECTIONS]
    if unknown or not sections:
        raise ConfigError(f"--sections {' '.join(cfg.sections)}: choose from {', '.join(BENCH_SECTIONS)}")
    from rock_dist.engine.run_plan import resolve_run_plan

    plan = resolve_run_plan(cfg)  # device, precision, compile and batch: 'auto' is the fast recipe's choice
    device = plan.torch_device
    cuda = device.type == "cuda"
    quick = cfg.quick
    backbone = cfg.backbone if cfg.backbone != "auto" else ("resnet18" if quick else "resnet50")
    image_size = cfg.image_size if any(cfg.image_size) else ((128, 160) if quick else (480, 640))
    stored = cfg.stored_size if any(cfg.stored_size) else ((96, 128) if quick else (480, 640))
    if min(image_size) < 64 or min(stored) < 24:
        raise ConfigError(f"--image_size {image_size} / --stored_size {stored}: too small (>= 64 / >= 24 pixels)")
    batch = plan.batch_size
    if batch < 2:
        raise ConfigError(f"--batch_size {batch}: training needs at least 2 images (BatchNorm)")
    for flag, value in (("--warmup", cfg.warmup), ("--repeats", cfg.repeats), ("--iters", cfg.iters),
                        ("--data_samples", cfg.data_samples), ("--num_images", cfg.num_images),
                        ("--infer_batch_size", cfg.infer_batch_size)):
        if value < (-1 if flag == "--warmup" else 0):
            raise ConfigError(f"{flag} {value}: must not be negative")
    return Settings(
        sections=sections, device=device, backbone=backbone, image_size=image_size,
        batch_size=batch, infer_batch_size=cfg.infer_batch_size or batch,
        precision=plan.precision, compile=plan.compile,
        warmup=cfg.warmup if cfg.warmup >= 0 else (1 if quick else (10 if cuda else 2)),
        repeats=cfg.repeats or (3 if quick else 5),
        iters=cfg.iters or (2 if quick else (20 if cuda else 3)),
        data_samples=cfg.data_samples or (48 if quick else 200),
        # On a GPU the fast loader runs up to 8 workers, each needing its own shards (8 images per shard).
        num_images=cfg.num_images or (48 if quick else (384 if cuda else 96)),
        stored_size=stored,
    )


def build_synthetic_shards(root: Path, num_images: int, stored_size: tuple[int, int], seed: int) -> Path:
    """A random NYUv2 look-alike (`synthetic.official_layout.make_random_dataset`) sharded into `root/shards` (8 per
    shard, so several loader workers get shards); returns the shard output directory."""
    from rock_dist.config import ShardsBuildConfig
    from rock_dist.synthetic.official_layout import make_random_dataset
    from rock_dist.shards import build_shards

    paths = make_random_dataset(root / "official", num_images, seed, stored_size[0], stored_size[1])
    build_shards(ShardsBuildConfig(dataset_path=str(paths.dataset_path), splits_path=str(paths.splits_path),
                                   normals_path=str(paths.normals_path or ""), no_normals=paths.normals_path is None,
                                   out=str(root / "shards"), samples_per_shard=8, num_workers=1, no_progress=True))
    return root / "shards"


def inference_recipes(rows: Sequence[Recipe]) -> list[Recipe]:
    """The training ladder reduced to the changes that matter for inference (precision, memory format, BN fold,
    compile): rows that differ from the previous one only in training-only switches are dropped."""
    out: list[Recipe] = []
    for recipe in rows:
        key = (recipe.precision, recipe.channels_last, recipe.fold_bn, recipe.compile)
        if out and (out[-1].precision, out[-1].channels_last, out[-1].fold_bn, out[-1].compile) == key:
            if recipe.name == "fast":
                out[-1] = recipe  # keep the name "fast" on the final configuration
            continue
        out.append(recipe)
    return out


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the requested sections; returns the report dict (meta, sections, summary) that `main` prints/writes."""
    from rock_dist.data.manifest import load_manifest

    st = resolve_settings(cfg)
    device = st.device
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rock_bench_", dir=cfg.work_dir or None) as tmp:
        if cfg.shards:
            shards = Path(cfg.shards)
        else:
            log(f"building {st.num_images} synthetic {st.stored_size[0]}x{st.stored_size[1]} images as shards "
                "(not timed)")
            shards = build_synthetic_shards(Path(tmp), st.num_images, st.stored_size, cfg.seed)
        train_dir, test_dir = str(shards / "train"), str(shards / "test")
        manifest = load_manifest(train_dir)  # DataError naming the file when the shards are not there
        model_config = ModelConfig(backbone=st.backbone, pretrained="none", image_size=st.image_size,
                                   num_classes=len(manifest.class_names) + 1, num_scenes=len(manifest.scene_types))
        loss_config = saved_postprocess(cfg.weights)
        recipes = ladder(device, batch_size=st.batch_size, compile=st.compile,
                         precision=st.precision)
        reference, fast = recipes[0], recipes[-1]

        meta: dict[str, Any] = {
            "device_info": report.device_info(device), "config": to_dict(cfg),
            "settings": {**dataclasses.asdict(st), "device": str(device)},
            "model": {"backbone": st.backbone, "image_size": list(st.image_size), "tasks": list(model_config.tasks),
                      "num_priors": None},
            "shards": {"path": str(shards) if cfg.shards else "synthetic (temporary)",
                       "train_samples": manifest.num_samples, "stored_size": list(st.stored_size)},
            "recipes": {"reference": reference.to_dict(), "fast": fast.to_dict(),
                        "ladder": [r.to_dict() for r in recipes]},
        }
        from rock_dist.model.priors import make_priors

        meta["model"]["num_priors"] = int(make_priors(st.image_size, st.backbone).shape[0])
        sections: dict[str, Any] = {}
        timing = {"warmup": st.warmup, "repeats": st.repeats, "iters": st.iters}

        def run_section(name: str, fn: Callable[[], dict[str, Any]]) -> None:
            if name not in st.sections:
                return
            t0 = time.perf_counter()
            try:
                sections[name] = fn()
            except RockError:
                raise
            except Exception as err:  # noqa: BLE001 - one broken section must not lose the others' numbers
                log(f"{name}: FAILED: {type(err).__name__}: {err}")
                sections[name] = {"rows": [], "skipped": f"failed: {type(err).__name__}: {err}",
                                  "error": f"{type(err).__name__}: {err}"}
            sections[name]["wall_s"] = time.perf_counter() - t0
            report.add_speedups(name, sections[name].get("rows", []))

        def data_section() -> dict[str, Any]:
            from rock_dist.perf.data_bench import run_data_benchmark

            result = run_data_benchmark(train_dir, num_samples=st.data_samples, batch_size=8,
                                        image_size=st.image_size, backbone=st.backbone, seed=cfg.seed,
                                        work_dir=tmp)
            return {"result": result, "rows": report.data_rows(result)}

        def step_section() -> dict[str, Any]:
            from rock_dist.perf.train_bench import bench_step, shard_batch

            cache: dict[int, Any] = {}

            def batch_source(b: int) -> Any:
                if b not in cache:
                    cache[b] = shard_batch(train_dir, b, model_config, seed=cfg.seed)
                return cache[b]

            return {"rows": bench_step(recipes, model_config, loss_config, device, batch_source=batch_source,
                                       seed=cfg.seed, log=log, **timing)}

        def e2e_section() -> dict[str, Any]:
            from rock_dist.perf.train_bench import bench_e2e

            ours_ref_step = dataclasses.replace(reference, name="+rock_dist loader", loader="rock_dist",
                                                num_workers=-1, device_matching=True)
            e2e_timing = {**timing, "warmup": max(2, st.warmup)}  # worker start-up must fall in the warm-up
            return {"rows": bench_e2e([reference, ours_ref_step, fast], model_config, loss_config, device,
                                      train_dir=train_dir, seed=cfg.seed, log=log, **e2e_timing)}

        def infer_section() -> dict[str, Any]:
            from rock_dist.perf.infer_bench import bench_infer

            sizes = sorted({1, st.infer_batch_size})
            return {"rows": bench_infer(inference_recipes(recipes), model_config, loss_config, device,
                                        batch_sizes=sizes, seed=cfg.seed, nms_load=cfg.nms_load, log=log, **timing),
                    "nms_load": cfg.nms_load}

        def eval_section() -> dict[str, Any]:
            from rock_dist.perf.infer_bench import bench_eval

            fast_eval = dataclasses.replace(fast, batch_size=st.infer_batch_size)
            return {"rows": bench_eval([reference, fast_eval], model_config, loss_config, device, test_dir=test_dir,
                                       repeats=max(1, min(3, st.repeats)), seed=cfg.seed, nms_load=cfg.nms_load,
                                       log=log)}

        for name, fn in (("data", data_section), ("step", step_section), ("e2e", e2e_section),
                         ("infer", infer_section), ("eval", eval_section)):
            run_section(name, fn)

        if cfg.find_max_batch:
            reason = memory.max_batch_not_applicable(device)
            if reason is not None:
                sections["max_batch"] = {"skipped": reason}
                log(f"max batch: {reason}")
            else:
                log("max batch: searching (doubling, then bisection on out-of-memory)")
                result = memory.find_max_train_batch_size(model_config, loss_config, fast, device,
                                                          max_batch=cfg.max_batch)
                sections["max_batch"] = {"result": result.to_dict(), "recipe": fast.describe()}

    out = {"meta": meta, "sections": sections}
    out["meta"]["wall_s"] = time.perf_counter() - started
    out["summary"] = report.summarize(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console

    cfg = parse_config(BenchConfig, argv, prog=command_name("rock_dist.bench"))
    err = Console(stderr=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        err.print(f"[dim]{time.perf_counter() - started:7.1f}s[/dim] {message}", highlight=False)

    if cfg.threads < 0:
        raise ConfigError(f"--threads {cfg.threads}: use 0 (torch's default) or a positive count")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        result = run_benchmark(cfg, log=log)
    finally:
        torch.set_num_threads(threads)
    args = list(sys.argv[1:] if argv is None else argv)
    result["meta"]["command"] = shlex.join([*command_words("rock_dist.bench"), *args])
    # Off a terminal (CI logs, pipes) Rich would wrap the wide table at 80 columns; give it room instead.
    console = Console(width=None if sys.stdout.isatty() else 200)
    for renderable in report.render(result):
        console.print(renderable)
    mb = result["sections"].get("max_batch")
    if mb is not None:
        console.print(f"largest training batch: {mb['result']['batch_size']} ({mb['recipe']})" if "result" in mb
                      else f"largest training batch: not applicable — {mb['skipped']}")
    settings = result["meta"]["settings"]
    console.print(f"ran: {settings['backbone']} {settings['image_size'][0]}x{settings['image_size'][1]}, fast batch "
                  f"{settings['batch_size']}, reference batch 8, warm-up {settings['warmup']}, {settings['repeats']} "
                  f"x {settings['iters']} iterations, in {result['meta']['wall_s']:.0f} s")
    if cfg.json:
        atomic_write_json(cfg.json, result)
        console.print(f"report: {cfg.json}")
    failed = [name for name, s in result["sections"].items() if s.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
