"""CUDA smoke tests of the GPU paths whose CPU versions are tests/test_cpu_paths.py: compiled step, fp16 autocast +
GradScaler through the trainer with a resume, fused Adam, the batch-size probe against real out-of-memory errors,
the one host synchronisation per step (torch.cuda.set_sync_debug_mode), no graph breaks in the compiled model, and
the batched device colour jitter.

Every test here is marked `cuda`: skipped on machines without CUDA (CI; the skip is expected there), run on a GPU
machine by launch/gpu_check.sh (`pytest -m cuda`). Model: resnet18 at 128x160, so the whole file takes about a
minute on one H100/H200 (compilation included).
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Iterator

import pytest
import torch

from rock_dist.config import LossConfig, ModelConfig, TrainConfig, parse_config
from rock_dist.data.device_augment import BatchAugment
from rock_dist.data.transforms import apply_color_jitter, draw_jitter_params
from rock_dist.engine import checkpoint as ckpt
from rock_dist.engine import memory
from rock_dist.engine.fast_path import Recipe
from rock_dist.engine.step import recipe_step_parts, train_step
from rock_dist.engine.synthetic_batch import synthetic_batch

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("fresh_accelerate_state")]

MODEL = ModelConfig(backbone="resnet18", pretrained="none", image_size=(128, 160))
FAST = Recipe(name="cuda-fast", precision="bf16", channels_last=True, fused_adam=True, device_matching=True,
              cudnn_benchmark=True)


@pytest.fixture(autouse=True)
def no_test_hooks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("ROCK_DIST_FAULT_NONFINITE", "ROCK_DIST_RECORD_DIR", memory.FAKE_LIMIT_ENV, "WORLD_SIZE",
                "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(var, raising=False)
    yield
    torch.cuda.empty_cache()


def _pinned_batch(b: int, *, jitter: bool = True) -> dict[str, torch.Tensor]:
    """A synthetic CPU batch in pinned memory, as the loader workers deliver it on CUDA machines, then through the
    training stream's augmentation step (with `jitter`: the colour jitter applied on the GPU)."""
    batch = synthetic_batch(b, MODEL)
    if jitter:
        batch["color_jitter"] = torch.stack([draw_jitter_params(random.Random(i)) for i in range(b)])
    pinned = {k: v.pin_memory() for k, v in batch.items()}
    return dict(BatchAugment(torch.device("cuda"), MODEL.image_size, (1, 1))(pinned))


def test_compiled_fast_step_trains_with_no_graph_breaks() -> None:
    import torch._dynamo

    parts = recipe_step_parts(MODEL, LossConfig(), FAST, "cuda")
    torch._dynamo.reset()
    images = torch.randn(4, 3, *MODEL.image_size, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(ckpt.unwrap(parts.model))(images)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    compiled = recipe_step_parts(MODEL, LossConfig(), Recipe(**{**FAST.to_dict(), "compile": True}), "cuda")
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    before = [p.detach().clone() for p in compiled.model.parameters()]
    batch = _pinned_batch(4)
    losses = [train_step(compiled, [batch], step=i + 1)["loss"] for i in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert any(not torch.equal(a, b) for a, b in zip(before, compiled.model.parameters()))


def test_one_host_synchronisation_per_step() -> None:
    """torch.cuda.set_sync_debug_mode reports every synchronising CUDA call: a steady-state step makes exactly one
    (the packed read of the all-reduced loss components, non-finite flags and norms)."""
    parts = recipe_step_parts(MODEL, LossConfig(), FAST, "cuda")
    parts.clip_grad_norm = 10.0
    batch = _pinned_batch(4)
    for step in range(2):  # warm-up: cuDNN autotuning and lazy initialisation synchronise
        train_step(parts, [batch], step=step + 1)
    torch.cuda.synchronize()
    steps = 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step in range(steps):
                train_step(parts, [batch], step=step + 3)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == steps, syncs


def test_fp16_grad_scaler_on_cuda_is_checkpointed_and_restored(shard_dir: Path, tmp_path: Path) -> None:
    from rock_dist.engine.trainer import Trainer

    def cfg(*extra: str) -> TrainConfig:
        return parse_config(TrainConfig, [
            "--backbone", "resnet18", "--pretrained", "none", "--image_size", "128", "160", "--num_workers", "0",
            "--no_verbose", "--train_path", str(shard_dir / "train"), "--val_path", "", "--writer_path", "",
            "--coco_json_save_path", "", "--save_path", str(tmp_path / "ckpt"), "--batch_size", "2",
            "--mixed_precision", "fp16", "--compile", "no", "--device", "cuda", "--num_iters", "2", *extra])

    trainer = Trainer(cfg())
    assert trainer.device.type == "cuda" and trainer.recipe.fused_adam
    assert trainer.optimizer.optimizer.defaults["fused"] is True
    seen: list[torch.dtype] = []
    handle = ckpt.unwrap(trainer.model).backbone.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.fit()
    handle.remove()
    assert seen and seen[0] == torch.float16
    saved = ckpt.read_checkpoint(ckpt.resolve_resume_path(str(tmp_path / "ckpt")))
    assert saved["scaler"]["scale"] == trainer.accelerator.scaler.get_scale()
    resumed = Trainer(cfg("--checkpoint_path", str(tmp_path / "ckpt")))
    assert resumed.accelerator.scaler.state_dict() == saved["scaler"]


def test_batch_probe_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real probe on the GPU fits the capped search (64x64, up to 16), and a real CUDA out-of-memory error is
    recognised as one (the search relies on it)."""
    small = ModelConfig(backbone="resnet18", pretrained="none", image_size=(64, 64))
    result = memory.find_max_train_batch_size(small, LossConfig(), FAST, "cuda", max_batch=16)
    assert result.batch_size == 16 and result.capped
    with pytest.raises(torch.OutOfMemoryError) as err:
        torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # 1 PiB: plain allocation, refused at once
    assert memory.is_out_of_memory(err.value)
    monkeypatch.setenv(memory.FAKE_LIMIT_ENV, "13")
    assert memory.find_max_train_batch_size(small, LossConfig(), FAST, "cuda", max_batch=64).batch_size == 12


def test_batched_colour_jitter_on_cuda_matches_the_cpu() -> None:
    images = torch.randint(0, 256, (8, 3, 32, 40), dtype=torch.uint8)
    params = torch.stack([draw_jitter_params(random.Random(i)) for i in range(8)])
    cpu = torch.stack([apply_color_jitter(im, p) for im, p in zip(images, params)])
    gpu = apply_color_jitter(images.cuda(), params)  # params stay on the host, as prepare_batch keeps them
    assert (gpu.cpu().int() - cpu.int()).abs().max() <= 1
