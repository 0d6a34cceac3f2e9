"""The GPU-oriented training paths, exercised on a CPU wherever torch allows (issue 16, item 1):

- fp16 autocast + GradScaler on the CPU through the trainer, the scaler's state in the checkpoint and back on resume;
- fused Adam on the CPU, as the trainer's recipe sets it up (the fused kernel really runs; same update as foreach);
- the `--auto_batch_size` probe against a fake memory limit (engine.memory's test hook): the real training step runs
  and the search finds the known answer, in one process and in 2 processes through the real launcher (minimum over
  the ranks);
- graph breaks: none in the model, the criterion and the loss normalisation that a compiled step runs (dynamo);
- host synchronisations: `engine.step.train_step` reads the device exactly once per step (the packed all-reduce of
  the loss components, non-finite flags, gradient norm and GradNorm norms); every other host read in the step is of
  host data (the CPU batch's counts and colour-jitter order); under NCCL those host sums use their own gloo group;
- `--compile yes` (inductor on the CPU) in 2 processes through the real launcher (slow).

The same paths on a GPU are tests/test_cuda_paths.py (run by launch/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

import rock_dist
from rock_dist.config import LossConfig, ModelConfig, TrainConfig, parse_config
from rock_dist.data.device_augment import BatchAugment
from rock_dist.data.transforms import draw_jitter_params
from rock_dist.engine import checkpoint as ckpt
from rock_dist.engine import memory
from rock_dist.engine.fast_path import Recipe
from rock_dist.engine.step import recipe_step_parts, train_step
from rock_dist.engine.synthetic_batch import synthetic_batch
from rock_dist.engine.task_weighting import build_task_weighting
from rock_dist.engine.trainer import Trainer

from numerics import HANG_GUARD_S
from small_network import SMALL_NETWORK

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(backbone="resnet18", pretrained="none", image_size=(64, 64))
SMALL = [*SMALL_NETWORK, "--image_size", "64", "64", "--num_workers", "0",
         "--writer_path", "", "--coco_json_save_path", ""]
FAST = Recipe(name="cpu-fast", fused_adam=True, device_matching=True)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest: Accelerate's singletons reset


@pytest.fixture(autouse=True)
def no_test_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ROCK_DIST_FAULT_NONFINITE", "ROCK_DIST_RECORD_DIR", memory.FAKE_LIMIT_ENV, "WORLD_SIZE",
                "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(var, raising=False)


def _cfg(shard_dir: Path, tmp_path: Path, *extra: str) -> TrainConfig:
    return parse_config(TrainConfig, [*SMALL, "--no_verbose", "--train_path", str(shard_dir / "train"),
                                      "--val_path", "", "--save_path", str(tmp_path / "ckpt"), "--batch_size", "2",
                                      "--model_save_freq", "0", *extra])


# ---------------------------------------------------------------------------------------------- fp16 on the CPU
@pytest.mark.slow  # two trainings (straight and resumed)
def test_fp16_autocast_and_grad_scaler_on_cpu_survive_a_resume(shard_dir: Path, tmp_path: Path) -> None:
    """fp16 autocast on the CPU with torch's CPU GradScaler: the convolutions run in fp16, the scaler scales the
    loss (a random network overflows at the initial scale, so the scale backs off: the scaler really acted), its
    state is in the checkpoint and a resumed run starts from it, not from a fresh scaler."""
    trainer = Trainer(_cfg(shard_dir, tmp_path, "--mixed_precision", "fp16", "--num_iters", "1"))
    scaler = trainer.accelerator.scaler
    assert trainer.plan.precision == "fp16" and isinstance(scaler, torch.amp.GradScaler)
    assert scaler.get_scale() == 2.0 ** 16  # torch's initial scale
    seen: list[torch.dtype] = []
    conv = ckpt.unwrap(trainer.model).backbone.conv1
    handle = conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    result = trainer.fit()
    handle.remove()
    assert seen == [torch.float16] and result.step == 1 and math.isfinite(result.losses[0])
    assert all(p.dtype == torch.float32 for p in ckpt.unwrap(trainer.model).parameters())  # fp32 master weights
    saved = ckpt.read_checkpoint(ckpt.resolve_resume_path(str(tmp_path / "ckpt")))
    assert saved["scaler"] is not None and saved["scaler"]["scale"] == scaler.get_scale()
    assert saved["scaler"]["scale"] != 2.0 ** 16  # it moved, so the resume below tells restored from fresh

    resumed = Trainer(_cfg(shard_dir, tmp_path, "--mixed_precision", "fp16", "--num_iters", "1",
                           "--checkpoint_path", str(tmp_path / "ckpt")))
    assert resumed.accelerator.scaler.state_dict() == saved["scaler"]


# -------------------------------------------------------------------------------------------- fused Adam on CPU
def test_trainer_recipe_runs_fused_adam_on_cpu(shard_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(_cfg(shard_dir, tmp_path, "--num_iters", "1"))
    assert trainer.recipe.fused_adam and trainer.optimizer.optimizer.defaults["fused"] is True
    calls = Counter()
    real = torch._fused_adam_

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["fused"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", counting)
    trainer.fit()
    assert calls["fused"] >= 1  # the optimizer step went through the fused CPU kernel


def test_fused_adam_makes_the_same_update_as_foreach_on_cpu() -> None:
    """Same start, same gradients: the fused kernel's first update is the foreach implementation's, up to float
    rounding (updates are ~lr = 5e-5 per element; a missing step or another lr would be far off). One step only:
    from the second on, rounding differences in the weights change the gradients, and Adam's first steps turn
    tiny gradient differences near zero into updates of opposite sign."""
    updates = []
    for fused in (True, False):
        torch.manual_seed(0)
        parts = recipe_step_parts(TINY, LossConfig(), Recipe(name="adam", fused_adam=fused, device_matching=True),
                                  "cpu")
        assert parts.optimizer.optimizer.defaults["fused"] is (True if fused else None)
        start = [p.detach().clone() for p in parts.model.parameters()]
        batch = synthetic_batch(2, TINY)
        train_step(parts, [batch], step=1)
        updates.append([p.detach() - s for p, s in zip(parts.model.parameters(), start)])
    assert max(u.abs().max() for u in updates[0]) > 5e-5  # the parameters did move
    for a, b in zip(*updates, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)  # atol: about one ulp of a weight near 1


# -------------------------------------------------------------------------------- batch-size probe, fake limit
def test_batch_probe_finds_the_fake_limit_running_the_real_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Limit 13 images: doubling 2, 4, 8 fit, 16 fails; bisection 12 fits, 14 fails → 12. Every attempt that fits
    ran the trainer's step twice (steady state), and one that fails was stopped inside the step's forward pass."""
    monkeypatch.setenv(memory.FAKE_LIMIT_ENV, "13")
    assert memory.max_batch_not_applicable("cpu") is None
    steps: list[int] = []
    failed_inside_step: list[int] = []
    real_step = memory.train_step

    def counting_step(parts: Any, micro_batches: Any, **kwargs: Any) -> Any:
        n = micro_batches[0]["images"].shape[0]
        try:
            out = real_step(parts, micro_batches, **kwargs)
        except torch.OutOfMemoryError:
            failed_inside_step.append(n)
            raise
        steps.append(n)
        return out

    monkeypatch.setattr(memory, "train_step", counting_step)
    result = memory.find_max_train_batch_size(TINY, LossConfig(), FAST, "cpu", max_batch=64)
    assert result.batch_size == 12 and result.first_failure == 14 and not result.capped
    assert result.attempts == [(2, True), (4, True), (8, True), (16, False), (12, True), (14, False)]
    assert steps == [2, 2, 4, 4, 8, 8, 12, 12] and failed_inside_step == [16, 14]
    monkeypatch.setenv(memory.FAKE_LIMIT_ENV, "x")
    with pytest.raises(Exception, match="expected N or N0,N1"):
        memory.fake_memory_limit()


# ------------------------------------------------------------------------------------------------ graph breaks
def _explain(fn: Any, *args: Any) -> Any:
    import torch._dynamo

    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


def _breaks(explained: Any) -> list[str]:
    return [f"{r.reason} at {r.user_stack[-1] if r.user_stack else '?'}" for r in explained.break_reasons]


def test_no_graph_breaks_in_the_compiled_forward_and_criterion() -> None:
    """What torch.compile compiles (the model) and what a compiled step would add (criterion with batched prior
    matching, loss normalisation) trace into ONE graph each: a graph break would split the compiled region and
    sync or fall back to Python in the middle of the step."""
    from rock_dist.data.batch import prepare_batch
    from rock_dist.engine.normalization import loss_ratios, micro_batch_counts
    from rock_dist.model.boxes import match_priors
    from rock_dist.model.builder import build_criterion, build_model

    torch.manual_seed(0)
    model = build_model(TINY).train()
    criterion = build_criterion(TINY, LossConfig(), match_priors)
    raw = synthetic_batch(2, TINY)
    prepared = prepare_batch(raw, "cpu")
    images = prepared["images"]
    counts = micro_batch_counts(raw)
    ratios = loss_ratios(counts, counts * 2, 2)  # unequal counts: the re-weighting branch, not the shortcut

    explained = _explain(model, images)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, _breaks(explained)
    outputs = model(images)
    explained = _explain(criterion, outputs, prepared)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, _breaks(explained)

    def forward_and_loss(x: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        losses = criterion(model(x), batch, ratios)
        return losses["loss"]

    explained = _explain(forward_and_loss, images, prepared)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, _breaks(explained)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the autocast region of a mixed-precision step
        explained = _explain(forward_and_loss, images.contiguous(memory_format=torch.channels_last), prepared)
    assert explained.graph_break_count == 0, _breaks(explained)


# ----------------------------------------------------------------------------------------- host synchronisations
_HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")
# Host reads of HOST data (the CPU batch before it moves, counts derived from it): no device synchronisation.
_HOST_DATA_SITES = {("engine/normalization.py", "micro_batch_counts"), ("engine/normalization.py", "loss_ratios"),
                    ("engine/normalization.py", "<dictcomp>"), ("data/transforms.py", "apply_color_jitter"),
                    ("engine/distributed.py", "host_all_reduce_sum")}


@contextlib.contextmanager
def _recorded_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter]:
    """Count every tensor→host read (and torch.nonzero) by the rock_dist function that made it, directly or
    through a library it called: (file under rock_dist/, function, method)."""
    root = str(Path(rock_dist.__file__).parent) + os.sep
    reads: Counter = Counter()
    on = [False]

    def site() -> tuple[str, str]:
        frame = sys._getframe(2)
        while frame is not None and not frame.f_code.co_filename.startswith(root):
            frame = frame.f_back
        return (frame.f_code.co_filename[len(root):], frame.f_code.co_name) if frame else ("?", "?")

    def wrap(original: Any, name: str) -> Any:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            if on[0]:
                reads[(*site(), name)] += 1
            return original(*args, **kwargs)
        return recorded

    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, wrap(getattr(torch.Tensor, name), name))
    monkeypatch.setattr(torch, "nonzero", wrap(torch.nonzero, "nonzero"))
    on[0] = True
    try:
        yield reads
    finally:
        on[0] = False


@pytest.mark.parametrize("variant", ["plain", "accumulation+clip+jitter", "gradnorm+clip"])
def test_train_step_reads_the_device_once_per_step(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from rock_dist.engine.runtime import local_accelerator

    k = 2 if variant.startswith("accumulation") else 1
    parts = recipe_step_parts(TINY, LossConfig(), FAST, "cpu",
                              accelerator=local_accelerator("no", cpu=True, accumulation_steps=k))
    batch = synthetic_batch(2, TINY)
    if "clip" in variant:
        parts.clip_grad_norm = 1.0
    if "jitter" in variant:
        batch["color_jitter"] = torch.stack([draw_jitter_params(random.Random(i)) for i in range(2)])
    # The training stream's augmentation step (here it only applies the jitter; a batch without any passes through)
    # runs before each step: recorded with it, its reads must be host data too.
    augment = BatchAugment("cpu", TINY.image_size, (1, 1))
    if variant.startswith("gradnorm"):
        parts.weighting = build_task_weighting("gradnorm", TINY.tasks, {"scene": 3.0, "depth": 3.0, "normals": 30.0})
    train_step(parts, [augment(batch)] * k, step=1)  # first step outside: lazy initialisation is not the steady state
    steps = 3
    with _recorded_host_reads(monkeypatch) as reads:
        for step in range(steps):
            values = train_step(parts, [augment(batch)] * k, step=step + 2)
    in_step = {key: n for key, n in reads.items() if key[0] == "engine/step.py"}
    assert in_step == {("engine/step.py", "train_step", "tolist"): steps}, in_step
    others = {key[:2] for key in reads if key[0] != "engine/step.py"}
    assert others <= _HOST_DATA_SITES, others - _HOST_DATA_SITES
    assert ("grad_norm" in values) == ("clip" in variant) and all(isinstance(v, float) for v in values.values())
    if variant.startswith("gradnorm"):
        assert all(math.isfinite(w) for w in parts.weighting.weights().values())


def test_colour_jitter_selects_images_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched (device) jitter path decides which images each operation touches from the CPU parameters:
    with the images elsewhere than the parameters, torch.nonzero only ever sees CPU tensors."""
    from rock_dist.data import transforms

    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    params = torch.stack([draw_jitter_params(random.Random(i)) for i in range(4)])
    devices: list[str] = []
    real = torch.nonzero

    def recording(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        devices.append(t.device.type)
        return real(t, *args, **kwargs)

    monkeypatch.setattr(torch, "nonzero", recording)
    # The batched branch runs for non-CPU images; `meta` stands in for the device here (shapes only, no values).
    out = transforms.apply_color_jitter(images.to("meta"), params)
    assert out.device.type == "meta" and out.shape == images.shape
    assert devices and set(devices) == {"cpu"}


# ------------------------------------------------------------------------------- 2 processes, the real launcher
def _launch(args: list[str], tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """launch/cpu_2proc.sh with `args`; asserts success and that both ranks joined one world of 2."""
    from test_train_distributed import _env, _free_port, _records

    record = tmp_path / "record"
    proc = subprocess.run([str(REPO / "launch" / "cpu_2proc.sh"), *SMALL, *args],
                          env=_env(MAIN_PORT=str(_free_port()), ROCK_DIST_RECORD_DIR=str(record), **env),
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = _records(record)
    assert all(r["world_size"] == 2 and r["distributed_type"] == "MULTI_CPU" for r in records)
    return proc, records


@pytest.mark.slow  # a 2-process launch
def test_auto_batch_size_with_a_fake_limit_in_two_processes(shard_dir: Path, tmp_path: Path) -> None:
    """Rank 0 fits 13 images (probe: 12, x 0.9 → 10), rank 1 fits 9 (probe: 8, x 0.9 → 6): both train with 6."""
    proc, records = _launch(["--train_path", str(shard_dir / "train"), "--val_path", "", "--auto_batch_size",
                             "--num_iters", "1", "--model_save_freq", "0", "--save_path", str(tmp_path / "ckpt")],
                            tmp_path, **{memory.FAKE_LIMIT_ENV: "13,9"})
    assert "--auto_batch_size: 6 images per process" in proc.stdout
    assert [len(r["image_ids"][0]) for r in records] == [6, 6]
    assert records[0]["digest"] == records[1]["digest"]


@pytest.mark.slow  # inductor compiles forward and backward in both processes: minutes on 2 cores
def test_compile_yes_on_cpu_in_two_processes(shard_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "inductor"
    proc, records = _launch(["--train_path", str(shard_dir / "train"), "--val_path", "", "--compile", "yes",
                             "--batch_size", "2", "--num_iters", "2", "--model_save_freq", "0",
                             "--save_path", str(tmp_path / "ckpt")], tmp_path, TORCHINDUCTOR_CACHE_DIR=str(cache))
    assert "compile True" in proc.stdout
    generated = list(cache.rglob("*.py"))
    assert generated, "inductor wrote no code: the model was not compiled"
    assert records[0]["digest"] == records[1]["digest"]
    assert all(len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"]) for r in records)


def test_host_collectives_get_their_own_gloo_group_under_nccl(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Under an NCCL default group (faked: a 1-process gloo group that reports "nccl"), the step's host-side sums
    go through a separate gloo group, created once per default group with the run's --dist_timeout, and the sum is
    a CPU tensor; on a real gloo default group that group itself is used (no second group)."""
    import datetime

    from rock_dist.engine import distributed

    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed._host_group() is None  # gloo default group: used as is
        created: list[Any] = []
        real_new_group = dist.new_group

        def recording_new_group(*args: Any, **kwargs: Any) -> Any:
            created.append(kwargs)
            return real_new_group(*args, **kwargs)

        monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
        monkeypatch.setattr(dist, "new_group", recording_new_group)
        monkeypatch.setattr(distributed, "host_group_timeout_s", 42.0)
        monkeypatch.setattr(distributed, "_HOST_GROUPS", {})
        group = distributed._host_group()
        assert group is not None and distributed._host_group() is group  # cached
        assert created == [{"backend": "gloo", "timeout": datetime.timedelta(seconds=42)}]
        t = torch.tensor([1.0, 2.0])
        dist.all_reduce(t, group=group)
        assert t.tolist() == [1.0, 2.0]
        monkeypatch.setattr(distributed, "is_distributed", lambda: True)
        out = distributed.host_all_reduce_sum(torch.tensor([3.0]))
        assert out.device.type == "cpu" and out.tolist() == [3.0]
        assert distributed.min_over_ranks(7) == 7
    finally:
        dist.destroy_process_group()
