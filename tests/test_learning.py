"""The system learns: a tiny ROCK trained on synthetic rooms beats its own untrained weights on held-out rooms.

Runs the public commands as a user would (`shards build`, `train`, `evaluate`) on rooms rendered in the official
NYUv2 layout. The comparison is against the same initial weights (same seed), evaluated the same way, so the only
difference between the two numbers is training.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rock_dist.config import ModelConfig
from rock_dist.data.constants import CLASS_NAMES, SCENE_TYPES
from rock_dist.synthetic.rooms import make_rooms_dataset
from rock_dist.engine.checkpoint import save_weights
from rock_dist.engine.runtime import seed_everything
from rock_dist.model.builder import build_model

from numerics import HANG_GUARD_S

IMAGE_SIZE = ("96", "128")
# No pretrained weights offline: the backbone's BatchNorms learn their statistics (see --backbone_bn). The
# quickstart's small network (resnet18 without layer4, light extra layers): 1.7x faster per step than the reference
# layout on a CPU, and it learns at least as fast per step (docs/quickstart_experiments.md).
MODEL_FLAGS = ["--backbone", "resnet18", "--backbone_stages", "3", "--extra_layers", "light", "--pretrained", "none",
               "--backbone_bn", "train", "--image_size", *IMAGE_SIZE]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                            timeout=HANG_GUARD_S)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _ap50(weights: Path, test_split: Path, out: Path) -> float:
    _run(["rock_dist.evaluate", str(weights), "--test_path", str(test_split), "--coco_json_save_path", str(out),
          "--device", "cpu", "--no_verbose"])
    return float(json.loads((out / "metrics.json").read_text())["AP50"])


@pytest.mark.slow  # ~85 s on a fast CPU, minutes on a slow one: CI runs it, `-m "not slow"` skips it
def test_training_on_rooms_raises_ap50_above_the_untrained_model(tmp_path: Path) -> None:
    files = make_rooms_dataset(tmp_path / "rooms", 160, seed=3, height=96, width=128)
    shards = tmp_path / "shards"
    _run(["rock_dist.shards", "build", "--dataset_path", str(files.dataset_path), "--splits_path",
          str(files.splits_path), "--normals_path", str(files.normals_path), "--out", str(shards),
          "--samples_per_shard", "16", "--no_progress", "--num_workers", "1"])

    # The untrained model: exactly the weights training starts from (the trainer seeds before building).
    seed_everything(0)
    config = ModelConfig(backbone="resnet18", backbone_stages=3, extra_layers="light", pretrained="none",
                         backbone_bn="train", image_size=(96, 128))
    untrained = tmp_path / "untrained.pt"
    save_weights(untrained, build_model(config), config, list(CLASS_NAMES), list(SCENE_TYPES))
    before = _ap50(untrained, shards / "test", tmp_path / "eval_before")

    _run(["rock_dist.train", "--train_path", str(shards / "train"), "--val_path", "", *MODEL_FLAGS,
          "--num_iters", "150", "--batch_size", "8", "--lr", "1e-3", "--scheduler_milestones", "120",
          "--save_path", str(tmp_path / "ckpt"), "--writer_path", "", "--model_save_freq", "0",
          "--num_workers", "1", "--no_verbose", "--seed", "0", "--cpu"])
    after = _ap50(tmp_path / "ckpt" / "weights_final.pt", shards / "test", tmp_path / "eval_after")

    print(f"AP@.5 on held-out rooms: untrained {before:.4f}, trained {after:.4f}")
    assert after > 0.0, f"AP@.5 after training is {after}"
    assert after > before, f"AP@.5 did not improve: untrained {before:.4f}, trained {after:.4f}"
