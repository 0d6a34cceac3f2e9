"""Tests of checkpoint and weights files: round trips, wrapper prefixes, weights_only, rotation, interrupted saves,
RNG state. In-process and CPU-only; the tiny resnet18 model at 128x160 input."""

from __future__ import annotations

import pickle
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from rock_dist.config import ModelConfig
from rock_dist.engine import checkpoint as ckpt
from rock_dist.engine.runtime import capture_rng_state, restore_rng_state
from rock_dist.errors import DataError
from rock_dist.model.builder import build_model

CLASSES = [f"class{i}" for i in range(19)]
SCENES = [f"scene{i}" for i in range(27)]


@pytest.fixture(scope="module")
def tiny_model() -> tuple[torch.nn.Module, ModelConfig]:
    cfg = ModelConfig(backbone="resnet18", pretrained="none", image_size=(128, 160), aux_tasks=("depth", "normals"))
    torch.manual_seed(1)
    model = build_model(cfg)
    with torch.no_grad():  # make buffers non-default so that losing them would show
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.uniform_(-1, 1)
    return model, cfg


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_weights_round_trip(tiny_model: tuple[torch.nn.Module, ModelConfig], tmp_path: Path) -> None:
    model, cfg = tiny_model
    path = ckpt.save_weights(tmp_path / "w.pt", model, cfg, CLASSES, SCENES)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # loadable without trusting pickles
    assert raw["format"] == ckpt.WEIGHTS_FORMAT and raw["class_names"] == CLASSES
    loaded, loaded_cfg, meta = ckpt.load_model(path, "cpu")
    assert loaded_cfg.backbone == "resnet18" and loaded_cfg.tasks == ("depth", "normals")
    assert loaded_cfg.pretrained == "none" and tuple(loaded_cfg.image_size) == (128, 160)
    assert meta["scene_types"] == SCENES and not loaded.training
    _assert_same_state(model, loaded)


def test_wrapper_prefixes_are_stripped(tiny_model: tuple[torch.nn.Module, ModelConfig], tmp_path: Path) -> None:
    model, cfg = tiny_model
    # What DDP(torch.compile(model)).state_dict() looks like.
    wrapped = OrderedDict((f"module._orig_mod.{k}", v) for k, v in model.state_dict().items())
    stripped = ckpt.strip_wrapper_prefixes(wrapped)
    assert list(stripped) == list(model.state_dict())
    torch.save({"format": ckpt.WEIGHTS_FORMAT, "model": wrapped, "model_config": ckpt.to_dict(cfg),
                "class_names": CLASSES, "scene_types": SCENES}, tmp_path / "wrapped.pt")
    loaded, _, _ = ckpt.load_model(tmp_path / "wrapped.pt")
    _assert_same_state(model, loaded)
    # A DDP-wrapped module unwraps to the plain one.
    holder = torch.nn.Module()
    holder.module = model
    assert ckpt.unwrap(holder) is model


def test_bad_files_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        ckpt.read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(DataError, match="garbage.pt: not a readable"):
        ckpt.read_checkpoint(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(DataError, match="format"):
        ckpt.read_checkpoint(tmp_path / "foreign.pt")
    # weights_only=True: a file that needs arbitrary unpickling is refused, not executed.
    with open(tmp_path / "pickled.pt", "wb") as handle:
        pickle.dump({"format": ckpt.WEIGHTS_FORMAT, "model": {}, "model_config": {}, "x": Path("/")}, handle,
                    protocol=2)
    with pytest.raises(DataError, match="pickled.pt"):
        ckpt.read_checkpoint(tmp_path / "pickled.pt")
    # Truncated checkpoint (e.g. a copy interrupted by a full disk).
    torch.save({"format": ckpt.WEIGHTS_FORMAT, "model": {"w": torch.zeros(1000)}, "model_config": {}},
               tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.pt"):
        ckpt.read_checkpoint(tmp_path / "cut.pt")


def test_weights_that_do_not_fit_the_config(tiny_model: tuple[torch.nn.Module, ModelConfig], tmp_path: Path
                                            ) -> None:
    model, cfg = tiny_model
    other = ModelConfig(backbone="resnet18", pretrained="none", image_size=(128, 160), aux_tasks=("scene",))
    torch.save({"format": ckpt.WEIGHTS_FORMAT, "model": model.state_dict(), "model_config": ckpt.to_dict(other)},
               tmp_path / "mismatch.pt")
    with pytest.raises(DataError, match="do not fit"):
        ckpt.load_model(tmp_path / "mismatch.pt")


def test_rotation_keeps_last_k(tmp_path: Path) -> None:
    manager = ckpt.CheckpointManager(tmp_path, keep=2)
    for step in (5, 10, 15, 20):
        manager.save({"format": ckpt.CHECKPOINT_FORMAT, "step": step, "model": {}, "model_config": {}}, step)
    assert [s for s, _ in ckpt.periodic_checkpoints(tmp_path)] == [15, 20]
    manager.save_best({"format": ckpt.CHECKPOINT_FORMAT, "step": 10, "model": {}, "model_config": {}})
    assert manager.best_path.is_file()
    # Rotation never touches the best checkpoint, and a directory resumes from its newest periodic one.
    manager.save({"format": ckpt.CHECKPOINT_FORMAT, "step": 25, "model": {}, "model_config": {}}, 25)
    assert manager.best_path.is_file()
    assert ckpt.resolve_resume_path(tmp_path) == manager.path_for(25)
    (tmp_path / "empty").mkdir()
    assert ckpt.resolve_resume_path(tmp_path / "empty") is None
    # --checkpoint_path auto: the same in the run's save directory, which need not exist yet.
    assert ckpt.resolve_resume_path("auto", tmp_path) == manager.path_for(25)
    assert ckpt.resolve_resume_path("auto", tmp_path / "empty") is None
    assert ckpt.resolve_resume_path("auto", tmp_path / "not_yet") is None
    with pytest.raises(DataError, match="no such file"):
        ckpt.resolve_resume_path(tmp_path / "nope.pt")


def test_interrupted_save_keeps_last_complete_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the middle of writing checkpoint 2: checkpoint 1 stays, loadable and newest; no partial file."""
    manager = ckpt.CheckpointManager(tmp_path, keep=1)
    first = {"format": ckpt.CHECKPOINT_FORMAT, "step": 1, "model": {"w": torch.ones(10)}, "model_config": {}}
    manager.save(first, 1)
    real_save = torch.save

    def interrupted(obj: object, f: object, *args: object, **kwargs: object) -> None:
        real_save(obj, f, *args, **kwargs)  # the bytes are written ...
        raise KeyboardInterrupt  # ... but the process is interrupted before the rename

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        manager.save({"format": ckpt.CHECKPOINT_FORMAT, "step": 2, "model": {"w": torch.zeros(10)},
                      "model_config": {}}, 2)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == [manager.path_for(1).name]
    assert ckpt.resolve_resume_path(tmp_path) == manager.path_for(1)
    assert ckpt.resolve_resume_path("auto", tmp_path) == manager.path_for(1)
    assert torch.equal(ckpt.read_checkpoint(manager.path_for(1))["model"]["w"], torch.ones(10))


def test_rng_state_round_trip_through_weights_only_file(tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = capture_rng_state()
    torch.save({"rng": [state]}, tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"][0])
    assert (random.random(), float(np.random.rand())) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_optimizer_state_is_saved_on_cpu() -> None:
    """Device-independent files: optimizer state tensors are copied to the CPU (so GPU runs load on CPU)."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = ckpt.to_cpu(opt.state_dict())
    tensors = [v for s in state["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    # A copy: training on afterwards does not change what was captured.
    before = state["state"][0]["exp_avg"].clone()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert torch.equal(state["state"][0]["exp_avg"], before)


def test_data_position_of_current_and_earlier_checkpoints() -> None:
    assert ckpt.samples_seen_of({"samples_seen": 36, "batch_in_epoch": 1, "batch_size": 2, "world_size": 2}) == 36
    # Earlier checkpoints counted micro-batches per rank from epoch 0: 3 batches of 2 on each of 4 ranks.
    assert ckpt.samples_seen_of({"batch_in_epoch": 3, "batch_size": 2, "world_size": 4}) == 24
