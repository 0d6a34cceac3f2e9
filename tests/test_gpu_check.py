"""launch/gpu_check.sh and its driver (rock_dist.perf.gpu_check), tested where CI runs, without a GPU: the shell
script parses, a failing stage is reported loudly and the next stage still runs, the numbers are read correctly
from the bench's and the data bench's JSON, and the whole script runs every stage at toy size on the CPU
(`--dry_run`, about 45 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rock_dist.perf import gpu_check
from rock_dist.perf.gpu_check import Stage, bench_results, data_results

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "gpu_check.sh"


def test_the_script_parses_and_is_executable() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert os.access(SCRIPT, os.X_OK)


def test_a_failed_stage_is_loud_and_the_next_stage_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    failing = gpu_check._run("exits3", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path, 30)
    assert failing.status == "failed" and failing.summary == "exit status 3"
    slow = gpu_check._run("sleeps", [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path, 0.5)
    assert slow.status == "timeout"
    printed = capsys.readouterr().out
    assert "!! STAGE exits3 FAILED (exit status 3)" in printed and "boom" in printed
    assert "!! STAGE sleeps TIMEOUT" in printed

    def broken_bench(*args: object) -> Stage:
        raise FileNotFoundError("no bench report")

    ran: list[str] = []
    monkeypatch.setattr(gpu_check, "make_shards", lambda root, dry_run: root / "shards")
    monkeypatch.setattr(gpu_check, "stage_bench", broken_bench)
    monkeypatch.setattr(gpu_check, "stage_data",
                        lambda *args: ran.append("data") or Stage("data", summary="3.0 samples/s per worker"))
    assert gpu_check.main(["--out", str(tmp_path), "--stages", "bench,data"]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert ran == ["data"] and report["failed_stages"] == ["bench"]
    assert [s["name"] for s in report["stages"]] == ["env", "bench", "data"]
    printed = capsys.readouterr().out
    assert "!! STAGE bench FAILED in the driver: FileNotFoundError" in printed and "FAILED: bench" in printed


def test_numbers_are_read_from_the_reports() -> None:
    bench = {"sections": {
        "step": {"rows": [{"recipe": "reference", "batch_size": 8, "img_per_s": 100.0, "peak_gpu_mib": 900.0},
                          {"recipe": "fast", "batch_size": 32, "img_per_s": 450.0, "peak_gpu_mib": 2100.0}]},
        "e2e": {"rows": [{"recipe": "reference", "batch_size": 8, "img_per_s": 80.0, "peak_gpu_mib": None},
                         {"recipe": "fast", "batch_size": 32, "img_per_s": 400.0, "peak_gpu_mib": None}]},
        "infer": {"rows": [{"recipe": "reference", "batch_size": 1, "img_per_s": 50.0},
                           {"recipe": "fast", "batch_size": 1, "img_per_s": 70.0},
                           {"recipe": "fast", "batch_size": 32, "img_per_s": 1600.0}]},
        "max_batch": {"result": {"batch_size": 192}}}}
    out = bench_results(bench)
    assert out["headline"]["step"] == "450.0 img/s (4.50x ref)" and out["headline"]["e2e"] == "400.0 img/s (5.00x ref)"
    assert out["headline"]["infer b1"] == "70.0 img/s" and out["headline"]["infer b32"] == "1600.0 img/s"
    assert out["headline"]["peak"] == "2100 MiB" and out["largest_batch"] == 192
    data = data_results({"ours": {"samples_per_s": 30.0}, "reference_style": {"samples_per_s": 9.0}}, 400.0, 16)
    assert data["workers_needed_per_gpu"] == 14 and "14 workers per GPU (16 CPUs here)" in data["verdict"]


@pytest.mark.slow  # every stage of the GPU check at toy size: ~45 s on 2 cores
def test_dry_run_runs_every_stage_on_the_cpu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROCK_DIST_", "ACCELERATE_"))}
    env.update(OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry_run"], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["env", "cuda_tests", "bench", "data"] and not report["failed_stages"]
    tests = stages["cuda_tests"]["results"]
    assert tests["tests"] >= 6 and tests["skipped"] == tests["tests"]  # no CUDA here: every cuda test skips
    rows = stages["bench"]["results"]["rows"]
    assert len(rows["step"]) >= 2 and len(rows["e2e"]) == 3 and {r["batch_size"] for r in rows["infer"]} == {1, 2}
    assert stages["data"]["results"]["samples_per_s_per_worker"] > 0
    assert stages["data"]["results"]["workers_needed_per_gpu"] >= 1
    assert "stage" in proc.stdout and "gpu_check: 4/4 stage(s) ok" in proc.stdout
