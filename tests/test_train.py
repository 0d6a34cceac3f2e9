"""In-process tests of the training engine (one process, CPU): LR schedule in global iterations, gradient
accumulation vs a large batch, exact resume, bf16 autocast, TensorBoard output, console modes, flag checks.

Multi-process behaviour (real launcher, DDP, NaN guard, loopback multi-machine) is in test_train_distributed.py.
Model: resnet18, input 128x160, --pretrained none, on the conftest's synthetic shards.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest
import torch

from rock_dist.config import TrainConfig, parse_config
from rock_dist.data.loader_spec import TrainLoaderSpec
from rock_dist.data.pipeline import make_train_loader
from rock_dist.engine import checkpoint as ckpt
from rock_dist.engine.console import TrainConsole
from rock_dist.engine.normalization import micro_batch_counts
from rock_dist.engine.run_plan import resolve_run_plan
from rock_dist.engine.trainer import Trainer, train
from rock_dist.errors import ConfigError, DataError

from numerics import HANG_GUARD_S
from small_network import SMALL_NETWORK

SMALL = [*SMALL_NETWORK, "--image_size", "128", "160", "--num_workers", "0",
         "--no_verbose"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each Trainer builds its own Accelerator; Accelerate keeps process-wide singletons, reset them around tests."""
    from accelerate.state import AcceleratorState, GradientState

    for var in ("ROCK_DIST_FAULT_NONFINITE", "ROCK_DIST_RECORD_DIR", "ACCELERATE_MIXED_PRECISION", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_cfg(shard_dir: Path, tmp_path: Path, *extra: str, val: bool = False) -> TrainConfig:
    argv = [*SMALL, "--train_path", str(shard_dir / "train"), "--val_path", str(shard_dir / "val") if val else "",
            "--save_path", str(tmp_path / "ckpt"), "--writer_path", "", "--coco_json_save_path", "",
            "--batch_size", "2", "--model_save_freq", "0", *extra]
    return parse_config(TrainConfig, argv)


def _pad_cat(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate two collated batches (boxes/labels padded to the larger M)."""
    m = max(a["labels"].shape[1], b["labels"].shape[1])
    out = {}
    for key in a:
        x, y = a[key], b[key]
        if key in ("boxes", "labels"):
            x = torch.cat([x, x.new_zeros((x.shape[0], m - x.shape[1], *x.shape[2:]))], 1)
            y = torch.cat([y, y.new_zeros((y.shape[0], m - y.shape[1], *y.shape[2:]))], 1)
        out[key] = torch.cat([x, y])
    return out


def _loader(shard_dir: Path, target_size: tuple[int, int]) -> Any:
    """A 1-process training stream of batches of 2 (the shapes the trainer expects)."""
    return make_train_loader(TrainLoaderSpec(str(shard_dir / "train"), image_size=(128, 160), target_size=target_size,
                                             batch_size=2, num_workers=0, seed=0, rank=0, world_size=1))


def _freeze_all_batchnorm(module: torch.nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in ckpt.unwrap(model).named_parameters() if p.grad is not None}


# -------------------------------------------------------------------------------------------------- schedule
def test_lr_schedule_counts_global_iterations(shard_dir: Path, tmp_path: Path) -> None:
    """With 2 micro-batches per step, the milestone at iteration 2 is reached after 2 optimizer steps (4 batches)."""
    cfg = make_cfg(shard_dir, tmp_path, "--num_iters", "4", "--gradient_accumulation_steps", "2", "--lr", "1e-4",
                   "--scheduler_milestones", "2", "3", "--scheduler_gamma", "0.5")
    result = train(cfg)
    assert result.step == 4 and len(result.losses) == 4
    assert result.lrs == pytest.approx([1e-4, 1e-4, 5e-5, 2.5e-5], rel=1e-12)
    assert all(math.isfinite(v) for v in result.losses)
    assert result.final_weights is not None and result.final_weights.is_file()
    # The run's flags are written beside its checkpoints, and `--config SAVE_PATH` gives them back.
    repeated = parse_config(TrainConfig, ["--config", str(tmp_path / "ckpt")])
    assert repeated.lr == 1e-4 and repeated.scheduler_milestones == (2, 3) and repeated.num_iters == 4
    assert repeated.model == cfg.model and repeated.data.train_path == cfg.data.train_path
    # The portable pair beside it, describing this run (docs/weights.md).
    description = json.loads(result.final_weights.with_suffix(".json").read_text())
    assert result.final_weights.with_suffix(".safetensors").is_file()
    assert description["provenance"]["iterations"] == 4 and description["provenance"]["train_config"]["lr"] == 1e-4
    assert description["postprocess"] == {"score_threshold": 0.05, "nms_iou": 0.3, "max_detections": 100,
                                          "conf_threshold": 0.4}


# -------------------------------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_equals_large_batch(shard_dir: Path, tmp_path: Path) -> None:
    """2 micro-batches of 2 give the same gradient and update as 1 batch of 4.

    BatchNorm of the ROCK/SSD layers normalises with batch statistics in training, which makes a batch of 4 and two
    batches of 2 different functions; for this comparison every BatchNorm is put in eval mode (running statistics),
    so the loss is a per-image function and the comparison is exact up to float summation order. One micro-batch's
    normals mask is half cleared so that the micro-batches hold different numbers of valid normal pixels: the
    global loss normalisation (engine.normalization) must then re-weight them. Tolerance: losses within 1e-5
    (relative), every gradient entry within 1e-5 x the largest gradient entry, parameters after the Adam step
    within 1e-8 (absolute) wherever the gradient is above float noise (see below).
    """
    cfg_acc = make_cfg(shard_dir, tmp_path / "a", "--gradient_accumulation_steps", "2", "--num_iters", "1")
    trainer = Trainer(cfg_acc)
    stream_iter = iter(_loader(shard_dir, trainer.target_size))
    b1, b2 = dict(next(stream_iter)), dict(next(stream_iter))
    b1["normals_mask"] = b1["normals_mask"].clone()
    b1["normals_mask"][:, :, : b1["normals_mask"].shape[2] // 2] = False
    counts1, counts2 = micro_batch_counts(b1), micro_batch_counts(b2)
    assert counts1[3] != counts2[3] and counts1[3] > 0  # the re-weighting is actually exercised
    big = _pad_cat(b1, b2)

    captured: dict[str, dict[str, torch.Tensor]] = {}
    initial = {k: v.clone() for k, v in ckpt.unwrap(trainer.model).state_dict().items()}
    trainer.model.train()
    _freeze_all_batchnorm(trainer.model)
    trainer.before_optimizer_step = lambda model: captured.__setitem__("acc", _grads(model))
    values_acc = trainer.train_step([b1, b2])
    after_acc = {k: v.clone() for k, v in ckpt.unwrap(trainer.model).state_dict().items()}
    del trainer

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg_big = make_cfg(shard_dir, tmp_path / "b", "--batch_size", "4", "--num_iters", "1")
    big_trainer = Trainer(cfg_big)
    ckpt.unwrap(big_trainer.model).load_state_dict(initial)  # same start (seeded anyway; made explicit)
    big_trainer.model.train()
    _freeze_all_batchnorm(big_trainer.model)
    big_trainer.before_optimizer_step = lambda model: captured.__setitem__("big", _grads(model))
    values_big = big_trainer.train_step([big])
    after_big = ckpt.unwrap(big_trainer.model).state_dict()

    assert values_acc["loss"] == pytest.approx(values_big["loss"], rel=1e-5)
    assert values_acc["loss_normals"] == pytest.approx(values_big["loss_normals"], rel=1e-5)
    ga, gb = captured["acc"], captured["big"]
    assert ga.keys() == gb.keys() and len(ga) > 50
    scale = max(g.abs().max().item() for g in gb.values())
    worst = max((ga[n] - gb[n]).abs().max().item() for n in ga)
    assert worst <= 1e-5 * scale, (worst, scale)
    # Adam's first update is lr * g / (|g| + eps), essentially lr * sign(g): entries whose gradient is at float
    # noise level may flip sign, so the updated parameters are compared where |g| > 1e-4 max|g|.
    names = dict(ckpt.unwrap(big_trainer.model).named_parameters())
    compared = 0
    for key in after_big:
        if key not in gb:
            assert torch.equal(after_acc[key], after_big[key]), key  # buffers (BN in eval: unchanged)
            continue
        mask = gb[key].abs() > 1e-4 * scale
        compared += int(mask.sum())
        assert torch.allclose(after_acc[key][mask], after_big[key][mask], rtol=0, atol=1e-8), key
    assert compared > 0.25 * sum(p.numel() for p in names.values())  # the check covers much of the model


# -------------------------------------------------------------------------------------------------- resume
@pytest.mark.slow  # three trainings
def test_resume_equals_straight_run(shard_dir: Path, tmp_path: Path) -> None:
    """4 iterations straight == 2 iterations, then resume from the step-2 checkpoint for the remaining 2.

    Losses and final weights must be bit-identical (tolerance 0): same data position (the pipeline's start_batch,
    here with a real loader worker), optimizer, scheduler (milestone at 3 crosses the resume point) and RNG states.
    The straight run also writes TensorBoard scalars and pictures and evaluates on val, which must not disturb it.
    """
    common = ["--num_iters", "4", "--scheduler_milestones", "3", "--num_workers", "1", "--keep_checkpoints", "5"]
    straight_cfg = make_cfg(shard_dir, tmp_path / "straight", *common, "--model_save_freq", "2",
                            "--writer_path", str(tmp_path / "tb"), "--image_to_tb_freq", "2",
                            "--train_eval_freq", "1", "--val_eval_freq", "2", "--save_best_on_val", val=True)
    straight = train(straight_cfg)
    assert straight.step == 4 and len(straight.losses) == 4
    assert straight.metrics is not None and straight.metrics["num_images"] > 0
    saved = ckpt.periodic_checkpoints(tmp_path / "straight" / "ckpt")
    assert [s for s, _ in saved] == [2, 4]
    assert (tmp_path / "straight" / "ckpt" / ckpt.BEST_NAME).is_file()

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed_cfg = make_cfg(shard_dir, tmp_path / "resumed", *common, "--checkpoint_path", str(saved[0][1]))
    resumed = train(resumed_cfg)
    assert resumed.step == 4
    assert resumed.losses == straight.losses[2:]  # only the remaining iterations ran, with identical losses
    assert resumed.lrs == straight.lrs[2:]
    assert resumed.digest == straight.digest  # bit-identical weights and buffers
    a = ckpt.read_checkpoint(saved[1][1])["model"]
    b = ckpt.read_checkpoint(resumed.final_weights)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    # TensorBoard got every loss component, lr, throughput, val metrics and the pictures.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/loss_det", "train/loss_loc", "train/loss_conf", "train/loss_scene",
                "train/loss_depth", "train/loss_normals", "train/lr", "train/images_per_s", "val/AP", "val/AP50"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    images = set(events.Tags()["images"])
    for tag in ("images/detections", "images/ground_truth", "images/depth_pred", "images/depth_gt",
                "images/normals_pred", "images/normals_gt", "images/scene"):
        assert tag in images, tag


# -------------------------------------------------------------------------------------------------- precision
def test_bf16_autocast_runs_on_cpu(shard_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(shard_dir, tmp_path, "--mixed_precision", "bf16", "--num_iters", "1")
    trainer = Trainer(cfg)
    assert trainer.plan.precision == "bf16" and trainer.accelerator.mixed_precision == "bf16"
    seen: list[torch.dtype] = []
    conv = ckpt.unwrap(trainer.model).backbone.conv1
    handle = conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    result = trainer.fit()
    handle.remove()
    assert seen and seen[0] == torch.bfloat16  # the convolution really ran under bf16 autocast
    assert result.step == 1 and math.isfinite(result.losses[0])
    assert all(p.dtype == torch.float32 for p in ckpt.unwrap(trainer.model).parameters())  # fp32 master weights


def test_precise_bn_recomputes_the_final_statistics_without_moving_the_data_position(shard_dir: Path,
                                                                                     tmp_path: Path) -> None:
    common = ["--num_iters", "2", "--backbone_bn", "train"]
    plain = train(make_cfg(shard_dir, tmp_path / "plain", *common))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    precise = train(make_cfg(shard_dir, tmp_path / "precise", *common, "--precise_bn_batches", "3"))
    assert precise.losses == plain.losses  # the training itself is the same
    a = ckpt.read_checkpoint(plain.final_weights)["model"]
    b = ckpt.read_checkpoint(precise.final_weights)["model"]
    tracked = [k for k in a if k.endswith("num_batches_tracked")]
    assert tracked and all(int(a[k]) == 2 for k in tracked)  # one forward per training step
    assert all(int(b[k]) == 3 for k in tracked)  # reset, then the 3 micro-batches of the pass
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("running_var"))
    assert all(torch.equal(a[k], b[k]) for k in a if "running" not in k and "num_batches" not in k)
    last = {name: ckpt.read_checkpoint(dict(ckpt.periodic_checkpoints(tmp_path / name / "ckpt"))[2])
            for name in ("plain", "precise")}
    # The pass's batches are not counted: a resume reads the stream where the training steps left it.
    assert ckpt.samples_seen_of(last["precise"]) == ckpt.samples_seen_of(last["plain"]) > 0
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--train_path", "x", "--precise_bn_batches", "-1"])


def test_run_plan_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    base = parse_config(TrainConfig, [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("rock_dist.engine.run_plan.dataset_vocabulary", lambda path: (["a", "b"], ["s"]))
    rt = resolve_run_plan(base)  # auto on a machine without CUDA: CPU, no autocast, no compile, no channels_last
    assert rt.cpu and rt.precision == "fp32" and not rt.compile and not rt.channels_last
    assert rt.accelerate_precision == "no"  # Accelerate's word for it, only where an Accelerator is built
    # fp16 on a CPU runs (CPU autocast + CPU GradScaler: test_cpu_paths.py) where torch has both.
    fp16 = resolve_run_plan(parse_config(TrainConfig, ["--mixed_precision", "fp16"]))
    assert fp16.cpu and fp16.precision == "fp16"
    monkeypatch.setattr("rock_dist.engine.run_plan.cpu_fp16_supported", lambda: False)
    with pytest.raises(ConfigError, match="fp16 on the CPU needs torch >= 2.3"):
        resolve_run_plan(parse_config(TrainConfig, ["--mixed_precision", "fp16"]))
    with pytest.raises(ConfigError, match="--device cuda"):
        resolve_run_plan(parse_config(TrainConfig, ["--device", "cuda"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    rt = resolve_run_plan(base)
    assert not rt.cpu and rt.precision == "bf16" and rt.compile and rt.channels_last
    assert resolve_run_plan(parse_config(TrainConfig, ["--cpu"])).cpu
    # The model is resolved against the shards' vocabulary (classes + background), the global batch from the layout.
    monkeypatch.setenv("WORLD_SIZE", "3")
    plan = resolve_run_plan(parse_config(TrainConfig, ["--batch_size", "4", "--gradient_accumulation_steps", "2"]))
    assert plan.model.num_classes == 3 and plan.model.num_scenes == 1 and plan.global_batch == 4 * 2 * 3


def test_auto_batch_size_refuses_cpu_and_keeps_a_resumed_batch(shard_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="--auto_batch_size.*CUDA"):
        Trainer(make_cfg(shard_dir, tmp_path, "--auto_batch_size", "--num_iters", "1"))
    # With a device where the search applies, the probe's answer replaces --batch_size; a resumed run keeps the
    # checkpoint's batch instead of probing again (its data position then stays exact).
    import rock_dist.engine.memory as memory

    monkeypatch.setattr(memory, "max_batch_not_applicable", lambda device: None)
    monkeypatch.setattr(memory, "auto_train_batch_size", lambda *a, **k: 4)
    trainer = Trainer(make_cfg(shard_dir, tmp_path, "--auto_batch_size", "--num_iters", "1"))
    assert trainer.plan.batch_size == 4 and trainer.global_batch == 4 and trainer.plan.batch_origin == "auto"
    assert trainer.cfg.data.batch_size == 2  # the flags themselves are never rewritten
    trainer.fit()
    monkeypatch.setattr(memory, "auto_train_batch_size", lambda *a, **k: 6)
    resumed = Trainer(make_cfg(shard_dir, tmp_path, "--auto_batch_size", "--num_iters", "2", "--checkpoint_path",
                               str(tmp_path / "ckpt")))
    assert resumed.plan.batch_size == 4 and resumed.plan.batch_origin == "checkpoint"


# -------------------------------------------------------------------------------------------------- input checks
def test_batch_of_one_is_refused(shard_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, ["--batch_size", "1"])
    assert exit_info.value.code == 2 and "at least 2 images per process" in capsys.readouterr().err
    trainer = Trainer(make_cfg(shard_dir, tmp_path, "--num_iters", "1"))
    batch = next(iter(_loader(shard_dir, trainer.target_size)))
    single = {k: v[:1] for k, v in batch.items()}
    with pytest.raises(DataError, match="at least 2"):
        trainer.train_step([single])


def test_resume_refuses_other_architecture_and_weights_files(shard_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(shard_dir, tmp_path / "a", "--num_iters", "1")
    result = train(cfg)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(ConfigError, match="weights-only"):
        Trainer(make_cfg(shard_dir, tmp_path / "b", "--num_iters", "2", "--checkpoint_path",
                         str(result.final_weights)))
    last = ckpt.periodic_checkpoints(tmp_path / "a" / "ckpt")[-1][1]
    with pytest.raises(ConfigError, match="aux_tasks"):
        Trainer(make_cfg(shard_dir, tmp_path / "b", "--num_iters", "2", "--checkpoint_path", str(last),
                         "--aux_tasks", "depth"))
    with pytest.raises(DataError, match="no such"):
        Trainer(make_cfg(shard_dir, tmp_path / "b", "--checkpoint_path", str(tmp_path / "missing.pt")))
    # Extending a run with a new milestone: the flags win, the lr is a function of the global iteration.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    extended = train(make_cfg(shard_dir, tmp_path / "c", "--num_iters", "3", "--checkpoint_path", str(last),
                              "--scheduler_milestones", "1", "--scheduler_gamma", "0.1"))
    assert extended.step == 3 and extended.lrs == pytest.approx([5e-6, 5e-6], rel=1e-12)


def test_missing_shards_are_a_clear_error(tmp_path: Path) -> None:
    from rock_dist.train import main

    with pytest.raises(DataError, match="nothing"):  # one line naming the missing path
        main([*SMALL, "--train_path", str(tmp_path / "nothing"), "--val_path", "", "--num_iters", "1"])


# -------------------------------------------------------------------------------------------------- console
def test_console_plain_lines_and_quiet_mode() -> None:
    out = io.StringIO()
    with TrainConsole(enabled=True, verbose=True, total_steps=10, start_step=0, log_every=5, stream=out) as console:
        for step in range(1, 11):
            console.update(step, {"loss": 1.5, "loss_det": 1.0, "loss_depth": 0.25}, 5e-5, 2.0, 16.0)
    lines = out.getvalue().splitlines()  # StringIO is not a terminal: plain lines, step 1 then every 5 steps
    assert [line.split(" |")[0] for line in lines] == ["step 1/10", "step 5/10", "step 10/10"]
    assert lines[1].startswith("step 5/10 | loss 1.5 det 1 depth 0.25 lr 5e-05")
    assert "16.0 img/s" in lines[1] and "eta" in lines[1]
    quiet = io.StringIO()
    with TrainConsole(enabled=True, verbose=False, total_steps=10, start_step=0, log_every=1, stream=quiet) as c:
        c.update(1, {"loss": 1.0}, 1e-3, 1.0, 1.0)
        c.print("progress detail")
        c.always("final summary")
    assert quiet.getvalue() == "final summary\n"
    silent = io.StringIO()
    with TrainConsole(enabled=False, verbose=True, total_steps=10, start_step=0, log_every=1, stream=silent) as c:
        c.update(1, {"loss": 1.0}, 1e-3, 1.0, 1.0)
        c.always("not on this rank")
    assert silent.getvalue() == ""


def test_console_rich_bar_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    with TrainConsole(enabled=True, verbose=True, total_steps=4, start_step=0, log_every=1, stream=out) as console:
        assert console.use_bar
        for step in range(1, 5):
            console.update(step, {"loss": 2.0, "loss_scene": 0.5}, 5e-5, 3.0, 24.0)
    text = out.getvalue()
    assert "4/4" in text and "24.0 img/s" in text and "scene 0.5" in text and "lr 5e-05" in text


def test_world_size_mismatch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launcher that started 2 processes which each see a world of 1 (docs/training.md) must not train."""
    from types import SimpleNamespace

    from rock_dist.engine.distributed import check_world_size

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="started 2 processes but this one sees a world of 1"):
        check_world_size(SimpleNamespace(num_processes=1, distributed_type="NO"))
    check_world_size(SimpleNamespace(num_processes=2, distributed_type="MULTI_CPU"))


@pytest.mark.slow  # a training interrupted by SIGINT in a subprocess
def test_ctrl_c_leaves_complete_checkpoints(shard_dir: Path, tmp_path: Path) -> None:
    """SIGINT to a training process while it writes a checkpoint every iteration: exit 130, every checkpoint file
    left behind loads, no temporary file remains."""
    import signal
    import subprocess
    import sys
    import time

    save = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "rock_dist.train", *SMALL, "--train_path", str(shard_dir / "train"),
           "--val_path", "", "--writer_path", "", "--batch_size", "2", "--num_iters", "1000",
           "--model_save_freq", "1", "--keep_checkpoints", "2", "--save_path", str(save)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROCK_DIST_", "ACCELERATE_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while len(ckpt.periodic_checkpoints(save)) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert len(ckpt.periodic_checkpoints(save)) >= 2, proc.communicate(timeout=5)
        proc.send_signal(signal.SIGINT)  # lands while the next iterations and checkpoint writes go on
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "interrupted" in err
    left = ckpt.periodic_checkpoints(save)
    assert left and not [p for p in save.iterdir() if p.name.startswith(".")]
    for step, path in left:
        assert ckpt.read_checkpoint(path)["step"] == step


# -------------------------------------------------------------------------------------------------- flags reach
def test_val_path_auto_takes_the_sibling_val_split_and_never_the_test_split(shard_dir: Path, tmp_path: Path) -> None:
    from rock_dist.engine.trainer import resolve_val_path

    assert resolve_val_path("auto", str(shard_dir / "train")) == str(shard_dir / "val")
    assert resolve_val_path("auto", str(shard_dir / "test")) == str(shard_dir / "val")  # a sibling, not itself
    alone = tmp_path / "only" / "train"
    alone.mkdir(parents=True)
    assert resolve_val_path("auto", str(alone)) == ""  # no val/ beside it: no validation, never test/
    assert resolve_val_path("auto", str(shard_dir / "train" / "shard-{000000..000001}.tar")) == ""
    assert resolve_val_path(str(shard_dir / "test"), str(shard_dir / "train")) == str(shard_dir / "test")
    with pytest.raises(DataError, match="--val_path"):
        Trainer(make_cfg(shard_dir, tmp_path / "x", "--val_path", str(tmp_path / "missing")))


def test_color_jitter_flag_reaches_the_training_stream(shard_dir: Path, tmp_path: Path) -> None:
    trainer = Trainer(make_cfg(shard_dir, tmp_path, "--color_jitter", "none", "--num_iters", "1"))
    trainer._open_stream()
    assert trainer._stream._transform.jitter == "none"


def _tracked(obj: Any, reads: set[str], prefix: str = "") -> Any:
    """A copy of a config dataclass (nested ones too) that records every field the engine reads as 'prefix.name'.

    Reads made by rock_dist.config itself (flag validation, to_dict for checkpoints) and by the dataclasses module
    (replace, eq) are not counts of use: a flag that only those touch does nothing."""
    names = {f.name for f in dataclasses.fields(obj)}

    def getattribute(self: Any, name: str) -> Any:
        if name in names and sys._getframe(1).f_globals.get("__name__") not in ("dataclasses", "rock_dist.config"):
            reads.add(prefix + name)
        return object.__getattribute__(self, name)

    cls = type(f"Tracked{type(obj).__name__}", (type(obj),), {"__getattribute__": getattribute})
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for name, value in values.items():
        if dataclasses.is_dataclass(value):
            values[name] = _tracked(value, reads, f"{prefix}{name}.")
    return cls(**values)


def test_every_training_flag_is_read_by_the_engine(shard_dir: Path, tmp_path: Path) -> None:
    """A flag that the trainer never reads does nothing (as --color_jitter once did): one short run with
    validation and TensorBoard reads every field of TrainConfig."""
    reads: set[str] = set()
    cfg = _tracked(make_cfg(shard_dir, tmp_path, "--num_iters", "1", "--val_eval_freq", "1", "--writer_path",
                            str(tmp_path / "tb"), val=True), reads)
    result = Trainer(cfg).fit()
    assert result.step == 1
    every = set()
    for f in dataclasses.fields(TrainConfig):
        sub = getattr(TrainConfig(), f.name)
        every |= ({f"{f.name}.{g.name}" for g in dataclasses.fields(sub)} if dataclasses.is_dataclass(sub)
                  else {f.name})
    unread = every - reads
    assert not unread, sorted(unread)
