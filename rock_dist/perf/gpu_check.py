"""The one device check of a GPU machine: `bash launch/gpu_check.sh` runs this driver (`python -m
rock_dist.perf.gpu_check`), which runs each stage as its own process with its own time limit, fails loudly per stage
and goes on to the next, and writes everything it measured to one JSON file plus a printed table.

Stages:
- env: versions, the device, which of rock_dist's dependencies import;
- cuda_tests: `pytest -m cuda` (tests/test_cuda_paths.py, tests/test_device_decode.py): compile, fp16 + GradScaler,
  fused Adam, the batch-size probe, the one host synchronisation per step, batched colour jitter and nvJPEG decoding
  on the GPU (on a machine without CUDA they are skipped, as expected);
- bench: `python -m rock_dist.bench` in one run: the reference recipe against the fast path (sections step, e2e
  with the trainer's step, infer with NMS at batch 1 and batched; peak GPU memory per row) and the largest training
  batch that fits;
- data: `python -m rock_dist.perf.data_bench`: samples/s of one loader worker, set against the images/s the GPU
  consumes in the bench's end-to-end fast row: the workers one GPU needs, and how many CPU cores the machine has.

`--dry_run` runs every stage at toy size on the CPU (what CI does, so that the script itself is known to work; the
numbers mean nothing). Output: OUT/gpu_check.json (OUT: --out, else $OUT, else ./gpu_check) plus each stage's log and
JSON beside it. Exit status 1 when any stage failed, after all of them ran. docs/performance.md explains the stages.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

# Per-stage time limits in seconds on a GPU machine (8 minutes in all with the synthetic shards and the installs).
GPU_LIMITS = {"cuda_tests": 120, "bench": 300, "data": 45}
DRY_LIMITS = {"cuda_tests": 300, "bench": 600, "data": 300}
CUDA_TEST_FILES = ("tests/test_cuda_paths.py", "tests/test_device_decode.py")
DEPENDENCIES = ("torch", "torchvision", "accelerate", "numpy", "scipy", "h5py", "PIL", "rich", "safetensors",
                "pycocotools", "webdataset", "tensorboard")


@dataclasses.dataclass
class Stage:
    """One stage's outcome: status "ok", "failed" or "timeout", its wall time, what it measured, its log."""

    name: str
    status: str = "ok"
    seconds: float = 0.0
    summary: str = ""
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    log: str = ""


def _run(name: str, cmd: Sequence[str], out: Path, limit_s: float, env: dict[str, str] | None = None) -> Stage:
    """Run one stage's command with its log in OUT/<name>.log; a non-zero exit or the limit marks it failed."""
    log_path = out / f"{name}.log"
    stage = Stage(name, log=str(log_path))
    print(f"== {name}: {' '.join(cmd)} (limit {limit_s:.0f} s)", flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(list(cmd), stdout=log, stderr=subprocess.STDOUT, timeout=limit_s,
                                env={**os.environ, **(env or {})}).returncode
            if rc != 0:
                stage.status, stage.summary = "failed", f"exit status {rc}"
        except subprocess.TimeoutExpired:
            stage.status, stage.summary = "timeout", f"stopped at its {limit_s:.0f} s limit"
    stage.seconds = time.perf_counter() - started
    if stage.status != "ok":
        tail = log_path.read_text(errors="replace")[-2000:]
        print(f"!! STAGE {name} {stage.status.upper()} ({stage.summary}); last lines of {log_path}:\n{tail}",
              flush=True)
    return stage


def _guarded(name: str, fn: Callable[[], Stage]) -> Stage:
    """A stage whose driver code itself broke (a missing file, unreadable JSON) fails alone, loudly."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - the next stage must still run
        print(f"!! STAGE {name} FAILED in the driver: {type(err).__name__}: {err}", flush=True)
        return Stage(name, status="failed", summary=f"driver: {type(err).__name__}: {err}")


# --------------------------------------------------------------------------------------------------------- stages
def stage_env() -> Stage:
    import torch

    stage = Stage("env")
    missing = []
    for module in DEPENDENCIES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    cuda = torch.cuda.is_available()
    stage.results = {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda_available": cuda, "device": torch.cuda.get_device_name() if cuda else platform.processor(),
                     "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
                     "cpu_count": os.cpu_count(), "missing_modules": missing}
    stage.summary = f"torch {torch.__version__}, {stage.results['device'] or 'CPU'}" + (
        f"; missing: {', '.join(missing)}" if missing else "")
    return stage


def stage_cuda_tests(out: Path, limit_s: float) -> Stage:
    junit = out / "cuda_tests.xml"
    stage = _run("cuda_tests", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider",
                                *CUDA_TEST_FILES, f"--junitxml={junit}"], out, limit_s)
    if junit.is_file():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        failed = [case.get("name") for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
        stage.results = {**counts, "failed_tests": failed}
        stage.summary = (f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
                         f"{counts['skipped']} skipped" + (" (no CUDA here: skips expected)"
                                                          if counts["skipped"] == counts["tests"] else ""))
    return stage


def stage_bench(out: Path, shards: Path, limit_s: float, dry_run: bool) -> Stage:
    report = out / "bench.json"
    cmd = [sys.executable, "-m", "rock_dist.bench", "--sections", "step,e2e,infer", "--find_max_batch",
           "--shards", str(shards), "--json", str(report)]
    if dry_run:
        cmd += ["--device", "cpu", "--backbone", "resnet18", "--image_size", "64", "64", "--batch_size", "2",
                "--infer_batch_size", "2", "--warmup", "0", "--repeats", "1", "--iters", "1", "--compile", "no",
                "--precision", "fp32", "--threads", "1"]
    else:
        cmd += ["--repeats", "3", "--max_batch", "256"]
    stage = _run("bench", cmd, out, limit_s)
    if report.is_file():
        stage.results = bench_results(json.loads(report.read_text()))
        stage.summary = stage.summary or "; ".join(f"{k} {v}" for k, v in stage.results.get("headline", {}).items())
    return stage


def bench_results(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers the check reports from a `rock_dist.bench` JSON: every row's img/s and peak memory, the fast
    path's speed-ups over the reference, the largest batch."""
    sections = report.get("sections", {})
    rows = {name: [{"recipe": r.get("recipe"), "batch_size": r.get("batch_size"), "img_per_s": r.get("img_per_s"),
                    "peak_gpu_mib": r.get("peak_gpu_mib")} for r in sections.get(name, {}).get("rows", [])]
            for name in ("step", "e2e", "infer")}
    headline: dict[str, str] = {}
    for name in ("step", "e2e"):
        if len(rows[name]) >= 2 and rows[name][0]["img_per_s"]:
            ref, fast = rows[name][0], rows[name][-1]
            headline[name] = f"{fast['img_per_s']:.1f} img/s ({fast['img_per_s'] / ref['img_per_s']:.2f}x ref)"
    infer = [r for r in rows["infer"] if r["img_per_s"]]
    for batch in sorted({r["batch_size"] for r in infer}):
        best = max((r for r in infer if r["batch_size"] == batch), key=lambda r: r["img_per_s"])
        headline[f"infer b{batch}"] = f"{best['img_per_s']:.1f} img/s"
    peaks = [r["peak_gpu_mib"] for name in rows for r in rows[name] if r["peak_gpu_mib"] is not None]
    if peaks:
        headline["peak"] = f"{max(peaks):.0f} MiB"
    max_batch = sections.get("max_batch", {})
    largest = max_batch.get("result", {}).get("batch_size")
    headline["largest batch"] = str(largest) if largest else f"n/a ({max_batch.get('skipped', 'not run')})"[:60]
    errors = {name: s["error"] for name, s in sections.items() if isinstance(s, dict) and s.get("error")}
    return {"rows": rows, "largest_batch": largest, "max_batch": max_batch, "section_errors": errors,
            "headline": headline, "settings": report.get("meta", {}).get("settings")}


def stage_data(out: Path, shards: Path, limit_s: float, dry_run: bool, consumed_img_s: float | None) -> Stage:
    result_path = out / "data_bench.json"
    samples = "16" if dry_run else "200"
    cmd = [sys.executable, "-m", "rock_dist.perf.data_bench", "--shards", str(shards / "train"), "--num_samples",
           samples, "--rounds", "1" if dry_run else "2", "--json", str(result_path)]
    if dry_run:
        cmd += ["--image_size", "64", "64", "--backbone", "resnet18", "--batch_size", "2"]
    stage = _run("data", cmd, out, limit_s)
    if result_path.is_file():
        stage.results = data_results(json.loads(result_path.read_text()), consumed_img_s, os.cpu_count() or 1)
        stage.summary = stage.summary or stage.results["verdict"]
    return stage


def data_results(result: dict[str, Any], consumed_img_s: float | None, cpus: int) -> dict[str, Any]:
    """One worker's rate against what the GPU consumes: the workers one GPU needs to be fed."""
    per_worker = float(result["ours"]["samples_per_s"])
    out: dict[str, Any] = {"samples_per_s_per_worker": per_worker,
                           "reference_style_per_worker": float(result["reference_style"]["samples_per_s"]),
                           "gpu_consumes_img_per_s": consumed_img_s, "cpu_count": cpus}
    if consumed_img_s:
        needed = math.ceil(consumed_img_s / per_worker)
        out["workers_needed_per_gpu"] = needed
        out["verdict"] = (f"{per_worker:.1f} samples/s per worker; the GPU takes {consumed_img_s:.0f} img/s: "
                          f"{needed} workers per GPU ({cpus} CPUs here)")
    else:
        out["verdict"] = f"{per_worker:.1f} samples/s per worker (no GPU rate to compare: bench e2e missing)"
    return out


# ---------------------------------------------------------------------------------------------------------- main
def default_out() -> Path:
    return Path(os.environ.get("OUT") or "gpu_check")


def make_shards(root: Path, dry_run: bool) -> Path:
    """Synthetic shards under `root` for the bench and the data stage (built once, not timed)."""
    from rock_dist.bench import build_synthetic_shards

    num, size = (16, (48, 64)) if dry_run else (128, (480, 640))
    print(f"== shards: {num} synthetic {size[0]}x{size[1]} images in {root}", flush=True)
    return build_synthetic_shards(root, num, size, seed=0)


def render(stages: list[Stage]) -> str:
    rows = [("stage", "status", "seconds", "result")]
    rows += [(s.name, s.status.upper() if s.status != "ok" else "ok", f"{s.seconds:.0f}", s.summary) for s in stages]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(width[i]) if i < 3 else c for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-" * (sum(width) + 6 + max(len(r[3]) for r in rows)))
    bench = next((s for s in stages if s.name == "bench"), None)
    if bench and bench.results.get("rows"):
        lines.append("")
        for name, section in bench.results["rows"].items():
            for r in section:
                mem = f", peak {r['peak_gpu_mib']:.0f} MiB" if r.get("peak_gpu_mib") is not None else ""
                rate = f"{r['img_per_s']:.1f} img/s" if r.get("img_per_s") else "-"
                lines.append(f"  {name:6s} {r['recipe']:<28s} batch {r['batch_size']!s:>4s}  {rate}{mem}")
    return "\n".join(lines)


def run_stages(wanted: Sequence[str], out: Path, work: Path, limits: Mapping[str, float], dry_run: bool
               ) -> list[Stage]:
    """The stages in `wanted`, in order, each guarded: one failing never stops the next."""
    stages = [_guarded("env", stage_env)]
    shards: Path | None = None
    if {"bench", "data"} & set(wanted):
        try:
            shards = make_shards(work, dry_run)
        except Exception as err:  # noqa: BLE001 - the tests can still run
            print(f"!! synthetic shards FAILED: {type(err).__name__}: {err}", flush=True)
            stages.append(Stage("shards", status="failed", summary=f"{type(err).__name__}: {err}"))
    if "cuda_tests" in wanted:
        stages.append(_guarded("cuda_tests", lambda: stage_cuda_tests(out, limits["cuda_tests"])))
    consumed = None
    if "bench" in wanted and shards is not None:
        bench = _guarded("bench", lambda: stage_bench(out, shards, limits["bench"], dry_run))
        stages.append(bench)
        e2e = bench.results.get("rows", {}).get("e2e", [])
        consumed = e2e[-1]["img_per_s"] if e2e else None
    if "data" in wanted and shards is not None:
        stages.append(_guarded("data", lambda: stage_data(out, shards, limits["data"], dry_run, consumed)))
    return stages


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rock_dist.perf.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="", help="output directory (default: $OUT, else ./gpu_check)")
    parser.add_argument("--dry_run", action="store_true", help="every stage at toy size on the CPU (for CI)")
    parser.add_argument("--stages", default="cuda_tests,bench,data", help="comma-separated subset to run")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    wanted = [s for s in args.stages.split(",") if s]
    limits = DRY_LIMITS if args.dry_run else GPU_LIMITS
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="rock_gpu_check_"))
    try:
        stages = run_stages(wanted, out, work, limits, args.dry_run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [s.name for s in stages if s.status != "ok"]
    report = {"dry_run": args.dry_run, "wall_s": time.perf_counter() - started, "failed_stages": failed,
              "stages": [dataclasses.asdict(s) for s in stages]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(render(stages), flush=True)
    print(f"gpu_check: {len(stages) - len(failed)}/{len(stages)} stage(s) ok"
          + (f", FAILED: {', '.join(failed)}" if failed else "") + f"; report: {out / 'gpu_check.json'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
