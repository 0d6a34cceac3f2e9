"""Tests of the benchmark (issue 6): the command end to end on tiny shards, that it times the trainer's own step
(issue 13), the recipes' numerical equivalence, the reference-style matching, and the largest-batch search logic
(with a fake memory limit, no GPU)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

from rock_dist.config import BenchConfig, LossConfig, ModelConfig, TrainConfig, parse_config
from rock_dist.errors import ConfigError
from rock_dist.model.builder import build_model
from rock_dist.engine.fast_path import apply_inference_recipe, match_per_image_on_cpu, prepare_model_for_training
from rock_dist.engine.memory import find_max_batch_size, find_max_train_batch_size
from rock_dist.engine.synthetic_batch import synthetic_batch
from numerics import EQUIVALENT_ATOL, EQUIVALENT_RTOL
from rock_dist.perf.recipes import fast_recipe, ladder, reference_recipe

SMALL = ModelConfig(backbone="resnet18", pretrained="none", image_size=(128, 160))
# Folding BN into the convolutions and channels_last only reorder the arithmetic, so the equivalence tests run in
# float64 (tests/numerics.py derives the eval-mode tolerance). In train mode the ROCK/SSD BatchNorms normalise by
# batch statistics, which on the tiny last maps (1x1 with 3 images: 3 values per channel) divide rounding
# differences by a small standard deviation; even a 1e4 amplification of float64's ~1e-13 leaves the largest
# difference below 1e-7 of the largest output, while a folding mistake shows at 1e-3 or more.
TRAIN_MODE_REL_TOL = 1e-7


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on the shared 2-core test machine two OpenMP threads stall whenever another process holds
    a core (measured 10x slower); the results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *SMALL.image_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _randomise_batchnorm(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics and affine weights (fresh BNs are identities, which would make folding trivially
    exact)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _twin_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    a = build_model(SMALL)
    _randomise_batchnorm(a)
    b = build_model(SMALL)
    b.load_state_dict(a.state_dict())
    return a.double(), b.double()


# ---------------------------------------------------------------------------------------------- the command
@pytest.mark.slow  # the whole bench command: CI runs it, `-m "not slow"` skips it
def test_bench_quick_runs_every_section_and_writes_json(shard_dir: Path, tmp_path: Path) -> None:
    from rock_dist.bench import main

    out = tmp_path / "bench.json"
    argv = ["--quick", "--shards", str(shard_dir), "--json", str(out), "--warmup", "0", "--repeats", "1",
            "--iters", "1", "--data_samples", "8", "--batch_size", "4", "--infer_batch_size", "4",
            "--find_max_batch", "--work_dir", str(tmp_path), "--threads", "1", "--image_size", "64", "80"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["device_info"]["device"] == "cpu"
    assert report["meta"]["model"] == {"backbone": "resnet18", "image_size": [64, 80],
                                       "tasks": ["scene", "depth", "normals"], "num_priors": report["meta"]["model"]
                                       ["num_priors"]}
    assert report["meta"]["settings"]["batch_size"] == 4
    sections = report["sections"]
    assert set(sections) == {"data", "step", "e2e", "infer", "eval", "max_batch"}
    assert "CUDA" in sections["max_batch"]["skipped"]  # CPU: the search says it does not apply
    for name in ("data", "step", "e2e", "infer", "eval"):
        rows = sections[name]["rows"]
        assert "error" not in sections[name], sections[name].get("error")
        names = [r["recipe"] for r in rows]
        assert names[0] == "reference" and "fast" in names, (name, names)
        assert rows[0]["speedup"] == pytest.approx(1.0)
        for row in rows:
            value = row["seconds"] if name == "eval" else row.get("img_per_s", row.get("samples_per_s"))
            assert value > 0 and value == value, (name, row)
            if name != "data":
                assert row["peak_gpu_mib"] is None and row["rss_mib"] > 0  # CPU: RSS instead of GPU peak
    data = {r["recipe"]: r for r in sections["data"]["rows"]}
    assert "fast, npy aux" in data  # the PNG shards were also read as --aux_format npy copies, same samples
    assert sections["data"]["result"]["ours_npy"]["decode_ms"] > 0
    step = {r["recipe"]: r for r in sections["step"]["rows"]}
    assert step["reference"]["config"]["precision"] == "fp32" and step["reference"]["batch_size"] == 8
    assert not step["reference"]["config"]["device_matching"] and not step["reference"]["config"]["fused_adam"]
    assert step["fast"]["config"]["fold_bn"] and step["fast"]["batch_size"] == 4
    assert "+BN fold" in step and "+batched matching" in step  # the intermediate rows
    e2e = {r["recipe"]: r for r in sections["e2e"]["rows"]}
    assert e2e["reference"]["loader"] == "reference" and e2e["fast"]["loader"] == "rock_dist"
    infer_batches = {(r["recipe"], r["batch_size"]) for r in sections["infer"]["rows"]}
    assert {("reference", 1), ("reference", 4), ("fast", 1), ("fast", 4)} <= infer_batches
    assert all(r["detections_per_image"] > 0 for r in sections["infer"]["rows"])  # NMS had work to do
    assert sections["eval"]["rows"][0]["num_images"] == sections["eval"]["rows"][1]["num_images"] > 0
    assert report["summary"]["items"]


def test_bench_rejects_unknown_section(tmp_path: Path) -> None:
    from rock_dist.bench import resolve_settings

    cfg = parse_config(BenchConfig, ["--sections", "step,warp"])
    with pytest.raises(ConfigError, match="--sections"):
        resolve_settings(cfg)
    ok = resolve_settings(parse_config(BenchConfig, ["--sections", "step,infer", "eval", "--quick"]))
    assert ok.sections == ["step", "infer", "eval"] and ok.backbone == "resnet18" and ok.image_size == (128, 160)


# ------------------------------------------------------------------------------------------ one training step
@contextlib.contextmanager
def _calls_of(function: Callable[..., Any]) -> Iterator[list[str]]:
    """Record every call of `function` while open, as the file name of the calling code. Matched by code object,
    so a call counts whatever name the caller reached the function by, and a copy of its code would not."""
    calls: list[str] = []

    def tracer(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is function.__code__:
            calls.append(Path(frame.f_back.f_code.co_filename).name)

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield calls
    finally:
        sys.settrace(previous)


def test_bench_times_the_step_the_training_loop_runs(shard_dir: Path, tmp_path: Path,
                                                     fresh_accelerate_state: None) -> None:
    """The benchmark's step and e2e sections (2 iterations each, tiny shards) and a 2-iteration training run all
    go through `engine.step.train_step`."""
    from accelerate.state import AcceleratorState, GradientState

    from rock_dist.data.manifest import load_manifest
    from rock_dist.engine import step as engine_step
    from rock_dist.engine.trainer import Trainer
    from rock_dist.perf.train_bench import bench_e2e, bench_step, shard_batch

    manifest = load_manifest(str(shard_dir / "train"))
    cfg = ModelConfig(backbone="resnet18", pretrained="none", image_size=(64, 80),
                      num_classes=len(manifest.class_names) + 1, num_scenes=len(manifest.scene_types))
    train_dir = str(shard_dir / "train")
    # The reference step (per-image CPU matching: the criterion's matcher argument) on the trainer's loader.
    recipe = dataclasses.replace(reference_recipe(batch_size=2), loader="rock_dist", num_workers=0)
    timing = {"warmup": 1, "repeats": 1, "iters": 1}
    cpu = torch.device("cpu")
    with _calls_of(engine_step.train_step) as calls:
        bench_step([recipe], cfg, LossConfig(), cpu, batch_source=lambda b: shard_batch(train_dir, b, cfg),
                   max_rounds=1, **timing)
        bench_e2e([recipe], cfg, LossConfig(), cpu, train_dir=train_dir, **timing)
        bench_calls = list(calls)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        trainer = Trainer(parse_config(TrainConfig, [
            "--backbone", "resnet18", "--pretrained", "none", "--image_size", "64", "80", "--num_workers", "0",
            "--no_verbose", "--train_path", train_dir, "--val_path", "", "--save_path", str(tmp_path / "ckpt"),
            "--writer_path", "", "--coco_json_save_path", "", "--batch_size", "2", "--model_save_freq", "0",
            "--num_iters", "2"]))
        result = trainer.fit()
    assert bench_calls == ["train_bench.py"] * 4  # warm-up + one timed iteration, per section
    assert calls[len(bench_calls):] == ["trainer.py"] * 2 and result.step == 2


def test_batch_size_probe_runs_the_trainers_step(monkeypatch: pytest.MonkeyPatch,
                                                 fresh_accelerate_state: None) -> None:
    from rock_dist.engine import memory
    from rock_dist.engine import step as engine_step

    monkeypatch.setattr(memory, "max_batch_not_applicable", lambda device: None)  # the CUDA-only search, on a CPU
    tiny = dataclasses.replace(SMALL, image_size=(64, 64))
    with _calls_of(engine_step.train_step) as calls:
        result = memory.find_max_train_batch_size(tiny, LossConfig(), reference_recipe(), "cpu", max_batch=4,
                                                  steps=1)
    assert result.batch_size == 4 and result.capped
    assert calls == ["memory.py"] * 2  # batches 2 and 4, one step each


# ------------------------------------------------------------------------------------------------ recipes
def test_ladder_goes_from_reference_to_fast_one_change_at_a_time() -> None:
    rows = ladder("cpu")
    ref = rows[0]
    assert ref == reference_recipe()
    assert (ref.precision, ref.batch_size, ref.compile, ref.fused_adam, ref.device_matching) == \
        ("fp32", 8, False, False, False)
    assert rows[-1].name == "fast" and rows[-1].fold_bn and rows[-1].device_matching
    assert not rows[-1].compile  # compile stays off on a CPU unless asked for
    assert ladder("cpu", compile=True)[-1].compile
    fields = ("batch_size", "precision", "channels_last", "cudnn_benchmark", "compile", "fused_adam", "fold_bn",
              "device_matching")
    for before, after in zip(rows[:-2], rows[1:-1]):  # ladder rows differ in exactly one switch
        assert sum(getattr(before, f) != getattr(after, f) for f in fields) == 1, (before.name, after.name)
    cuda_fast = fast_recipe("cuda")  # resolvable without a GPU: bf16 only where supported
    assert cuda_fast.channels_last and cuda_fast.compile and cuda_fast.fused_adam and cuda_fast.batch_size == 32


def test_cpu_fast_recipe_uses_bf16_only_with_bf16_instructions_on_x86(monkeypatch) -> None:
    import rock_dist.engine.recipes as choice
    import rock_dist.perf.recipes as recipes

    assert isinstance(recipes.amx_available(), bool)  # the real probe answers on any machine, never raises
    # The probes are the engine's (engine.recipes chooses; perf.recipes builds the ladder from its choice).
    monkeypatch.setattr(choice, "bf16_supported", lambda device: True)
    # AMX and AVX512_BF16 were measured faster in bf16 (README); Arm's bf16 is left to the autotune's measurement.
    for found, uses_bf16 in (("AMX", True), ("AVX512_BF16", True), ("ARM_BF16", False), (None, False)):
        monkeypatch.setattr(choice, "cpu_bf16_instructions", lambda found=found: found)
        fast = recipes.fast_recipe("cpu")
        assert (fast.precision, fast.channels_last) == (("bf16", True) if uses_bf16 else ("fp32", False)), found
        assert not fast.compile and fast.batch_size == 8
        rows = recipes.ladder("cpu")
        assert any(r.name == "+bf16" for r in rows) == uses_bf16


def test_inference_recipe_bn_fold_and_channels_last_keep_outputs() -> None:
    plain, fast = _twin_models()
    plain.eval()
    recipe = dataclasses.replace(reference_recipe(), fold_bn=True, channels_last=True)
    applied = apply_inference_recipe(fast, recipe, "cpu")
    assert applied.module.folded_batchnorm  # every conv→BN pair was folded
    x = _images()
    with torch.no_grad():
        want, got = plain(x), applied.model(x.contiguous(memory_format=torch.channels_last))
    assert set(want) == set(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=EQUIVALENT_RTOL, atol=EQUIVALENT_ATOL, msg=key)


def test_training_recipe_keeps_train_mode_outputs_and_saves_unfolded_weights() -> None:
    from rock_dist.model.fuse import unfolded_state_dict

    plain, fast = _twin_models()
    recipe = dataclasses.replace(reference_recipe(), fold_bn=True, channels_last=True)
    model = prepare_model_for_training(fast, recipe, "cpu")
    plain.train()
    model.train()
    x = _images(3)
    with torch.no_grad():
        want, got = plain(x), model(x)
    assert set(want) == set(got)
    for key in want:
        scale = float(want[key].abs().max())
        assert float((got[key] - want[key]).abs().max()) <= TRAIN_MODE_REL_TOL * scale, key
    # Weights saved through unfolded_state_dict load into an ordinary model and give the same function.
    restored = build_model(SMALL).double()
    restored.load_state_dict(unfolded_state_dict(model), strict=True)
    restored.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(x)["conf"], plain(x)["conf"], rtol=EQUIVALENT_RTOL,
                                   atol=EQUIVALENT_ATOL)


def test_per_image_cpu_matching_equals_batched_matching() -> None:
    from rock_dist.model.boxes import match_priors
    from rock_dist.model.priors import make_priors

    batch = synthetic_batch(5, dataclasses.replace(SMALL, num_classes=20), seed=3)
    priors = make_priors(SMALL.image_size, SMALL.backbone)
    want = match_priors(batch["boxes"], batch["labels"], priors)
    got = match_per_image_on_cpu(batch["boxes"], batch["labels"], priors)
    assert torch.equal(got.labels, want.labels)
    assert (got.labels > 0).any()
    pos = want.labels > 0
    torch.testing.assert_close(got.boxes[pos], want.boxes[pos])


def test_reference_criterion_gives_the_same_loss_as_the_batched_one() -> None:
    from rock_dist.model.builder import build_criterion

    torch.manual_seed(0)
    model = build_model(SMALL)
    criterion = build_criterion(SMALL, LossConfig())
    reference = build_criterion(SMALL, LossConfig(), matcher=match_per_image_on_cpu)
    batch = synthetic_batch(3, SMALL, seed=1)
    x = (batch["images"].float() - 128.0) / 64.0
    with torch.no_grad():
        outputs = model(x)
        want = criterion(outputs, batch)
        got = reference(outputs, batch)
    torch.testing.assert_close(got["loss"], want["loss"])
    torch.testing.assert_close(got["num_pos"], want["num_pos"])


# ------------------------------------------------------------------------------------------ max batch search
def _fake_device(limit: int, calls: list[int]):
    def try_batch(b: int) -> None:
        calls.append(b)
        if b > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory: tried batch {b}")
    return try_batch


@pytest.mark.parametrize("limit", [2, 3, 37, 64, 100, 511])
def test_find_max_batch_size_doubles_then_bisects(limit: int) -> None:
    calls: list[int] = []
    cleanups: list[int] = []
    result = find_max_batch_size(_fake_device(limit, calls), start=2, max_batch=1024,
                                 cleanup=lambda: cleanups.append(1))
    assert result.batch_size == limit
    assert result.first_failure is not None and result.first_failure > limit
    assert len(calls) == len(set(calls)) <= 2 * 11  # no repeated attempt, logarithmic count
    assert len(cleanups) == sum(1 for b in calls if b > limit)  # cleaned up after every OOM
    doubling = [b for b in calls if b & (b - 1) == 0]
    assert doubling[: len(doubling)] == sorted(doubling)


def test_find_max_batch_size_edges() -> None:
    calls: list[int] = []
    capped = find_max_batch_size(_fake_device(10_000, calls), start=2, max_batch=100)
    assert capped.batch_size == 100 and capped.capped and capped.first_failure is None
    assert find_max_batch_size(_fake_device(37, []), start=2, multiple_of=8).batch_size == 32
    with pytest.raises(ConfigError, match="even a batch of 2"):
        find_max_batch_size(_fake_device(1, []), start=2)

    def broken(b: int) -> None:
        raise ValueError("not a memory problem")
    with pytest.raises(ValueError, match="not a memory problem"):
        find_max_batch_size(broken)


def test_find_max_train_batch_size_refuses_cpu() -> None:
    with pytest.raises(ConfigError, match="CUDA"):
        find_max_train_batch_size(SMALL, LossConfig(), fast_recipe("cpu"), "cpu")


def test_interleaved_timing_repeats_rounds_until_the_ratios_are_stable() -> None:
    from rock_dist.perf.timing import measure_interleaved, relative_spread

    calls = {"a": 0, "b": 0}

    def fn(name: str):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    # An unbounded target stops at the minimum number of rounds, an unreachable one (a negative spread) runs to the
    # maximum: neither outcome depends on the machine's speed.
    timings, ratios = measure_interleaved([fn("a"), fn("b")], "cpu", warmup=1, min_rounds=2, max_rounds=5, iters=3,
                                          target_spread=float("inf"))
    assert [len(t.window_s) for t in timings] == [2, 2] and calls == {"a": 1 + 2 * 3, "b": 1 + 2 * 3}
    assert ratios[0] == [1.0, 1.0] and len(ratios[1]) == 2
    timings, ratios = measure_interleaved([fn("a"), fn("b")], "cpu", warmup=0, min_rounds=2, max_rounds=5, iters=1,
                                          target_spread=-1.0)
    assert [len(t.window_s) for t in timings] == [5, 5] and len(ratios[1]) == 5
    assert relative_spread([2.0, 2.0, 2.0]) == 0.0 and relative_spread([1.0, 2.0, 3.0]) == pytest.approx(1.0)
