"""Portable weights (NAME.safetensors + NAME.json beside NAME.pt): the same model and description from every file,
the JSON's fields, post-processing settings stored in both formats, and one clear error for each broken pair.
In-process and CPU-only; a tiny random resnet18 model at 64x80 input."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import torch

import rock_dist
from rock_dist.config import POSTPROCESS_FIELDS, LossConfig, ModelConfig, TrainConfig, resolve_postprocess
from rock_dist.engine import checkpoint as ckpt
from rock_dist.errors import DataError
from rock_dist.model.builder import build_model

CLASSES = [f"class{i}" for i in range(19)]
SCENES = [f"scene{i}" for i in range(27)]
SETTINGS = {"score_threshold": 0.1, "nms_iou": 0.45, "max_detections": 50, "conf_threshold": 0.6}


@pytest.fixture(scope="module")
def tiny_model() -> tuple[torch.nn.Module, ModelConfig]:
    cfg = ModelConfig(backbone="resnet18", pretrained="none", image_size=(64, 80))
    torch.manual_seed(2)
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-default buffers, so that a format losing them would show
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.uniform_(-1, 1)
    return model, cfg


def _save(model: torch.nn.Module, cfg: ModelConfig, directory: Path, **settings: float) -> Path:
    train_config = TrainConfig(model=cfg, loss=LossConfig(**settings), lr=3e-4)
    return ckpt.save_weights(directory / "weights_final.pt", model, cfg, CLASSES, SCENES, train_config=train_config,
                             iterations=12)


def test_every_file_of_the_pair_gives_the_model_of_the_pt(tiny_model: tuple[torch.nn.Module, ModelConfig],
                                                           tmp_path: Path) -> None:
    model, cfg = tiny_model
    pt = _save(model, cfg, tmp_path, **SETTINGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights_final.json", "weights_final.pt",
                                                          "weights_final.safetensors"]
    # Ordinary permissions, like the .pt (the safetensors writer alone would leave 0600).
    assert len({(tmp_path / name).stat().st_mode & 0o777 for name in ("weights_final.pt", "weights_final.json",
                                                                      "weights_final.safetensors")}) == 1
    images = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    reference, reference_cfg, reference_meta = ckpt.load_model(pt)
    with torch.no_grad():
        want = reference(images)
    for path in (tmp_path / "weights_final.safetensors", tmp_path / "weights_final.json"):
        loaded, loaded_cfg, meta = ckpt.load_model(path)
        assert loaded_cfg == reference_cfg
        assert {k: meta[k] for k in ("class_names", "scene_types", "postprocess", "provenance")} == \
            {k: reference_meta[k] for k in ("class_names", "scene_types", "postprocess", "provenance")}
        state, reference_state = loaded.state_dict(), reference.state_dict()
        assert state.keys() == reference_state.keys()
        assert all(torch.equal(state[k], reference_state[k]) for k in state), path
        with torch.no_grad():
            got = loaded(images)
        assert all(torch.equal(got[k], want[k]) for k in want), path  # identical, not merely close
    # Other tools read the tensors without rock_dist (and without unpickling anything).
    from safetensors import safe_open

    with safe_open(str(tmp_path / "weights_final.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == set(ckpt.model_state(model))


def test_the_json_describes_the_weights_like_the_pt(tiny_model: tuple[torch.nn.Module, ModelConfig],
                                                     tmp_path: Path) -> None:
    model, cfg = tiny_model
    pt = _save(model, cfg, tmp_path, **SETTINGS)
    description = json.loads((tmp_path / "weights_final.json").read_text())
    assert description["format"] == "rock_dist-weights" and description["version"] == 1
    assert description["model_config"]["backbone"] == "resnet18" and description["model_config"]["image_size"] == [
        64, 80]
    assert description["class_names"] == CLASSES and description["scene_types"] == SCENES
    assert description["postprocess"] == SETTINGS
    provenance = description["provenance"]
    assert provenance["rock_dist_version"] == rock_dist.__version__ and provenance["torch_version"] == torch.__version__
    assert provenance["iterations"] == 12 and provenance["train_config"]["lr"] == 3e-4
    assert provenance["train_config"]["loss"]["nms_iou"] == 0.45 and isinstance(provenance["command"], str)
    assert datetime.fromisoformat(provenance["date"]).tzinfo is not None
    tensors = tmp_path / "weights_final.safetensors"
    assert description["weights_file"] == tensors.name
    assert description["weights_sha256"] == hashlib.sha256(tensors.read_bytes()).hexdigest()
    # The .pt carries the same description (loadable with weights_only, like every rock_dist file).
    raw = torch.load(pt, map_location="cpu", weights_only=True)
    assert {k: v for k, v in raw.items() if k != "model"} == {
        k: v for k, v in description.items() if k not in ("weights_file", "weights_sha256")}


def test_postprocess_settings_read_back_from_both_formats(tiny_model: tuple[torch.nn.Module, ModelConfig],
                                                          tmp_path: Path) -> None:
    model, cfg = tiny_model
    pt = _save(model, cfg, tmp_path, **SETTINGS)
    for path in (pt, tmp_path / "weights_final.safetensors"):
        saved = ckpt.load_model(path)[2]["postprocess"]
        assert saved == SETTINGS
        resolved = resolve_postprocess(saved)
        assert {name: getattr(resolved, name) for name in POSTPROCESS_FIELDS} == SETTINGS
    # The inference bench decodes with them too.
    from rock_dist.perf.infer_bench import saved_postprocess

    assert saved_postprocess(str(tmp_path / "weights_final.safetensors")).nms_iou == 0.45
    assert saved_postprocess("") == LossConfig()
    # A weights file written before the settings were stored decodes with the defaults.
    old = {"format": ckpt.WEIGHTS_FORMAT, "model": ckpt.model_state(model), "model_config": ckpt.to_dict(cfg),
           "class_names": CLASSES, "scene_types": SCENES}
    torch.save(old, tmp_path / "old.pt")
    assert ckpt.load_model(tmp_path / "old.pt")[2]["postprocess"] == {}
    # A stored setting out of range is an error naming the file and the setting.
    description = json.loads((tmp_path / "weights_final.json").read_text())
    description["postprocess"]["nms_iou"] = 2.0
    (tmp_path / "weights_final.json").write_text(json.dumps(description))
    with pytest.raises(DataError, match=r"weights_final.safetensors: stored post-processing setting nms_iou 2.0"):
        ckpt.load_model(tmp_path / "weights_final.safetensors")


def test_broken_pairs_are_one_clear_error(tiny_model: tuple[torch.nn.Module, ModelConfig], tmp_path: Path) -> None:
    model, cfg = tiny_model
    _save(model, cfg, tmp_path / "a")
    other = build_model(cfg)
    _save(other, cfg, tmp_path / "b")
    tensors, description = tmp_path / "a" / "weights_final.safetensors", tmp_path / "a" / "weights_final.json"

    shutil.copy(description, tmp_path / "kept.json")
    description.unlink()
    with pytest.raises(DataError, match="weights_final.json is missing"):
        ckpt.read_checkpoint(tensors)
    shutil.copy(tmp_path / "b" / "weights_final.json", description)  # the JSON of another run
    with pytest.raises(DataError, match="SHA-256 differs"):
        ckpt.read_checkpoint(tensors)
    description.write_text("{not json")
    with pytest.raises(DataError, match="weights_final.json: not a readable rock_dist weights description"):
        ckpt.read_checkpoint(tensors)
    description.write_text(json.dumps({"architectures": ["SomethingElse"]}))  # a foreign config.json
    with pytest.raises(DataError, match="unknown 'format'"):
        ckpt.read_checkpoint(tensors)
    shutil.copy(tmp_path / "kept.json", description)
    tensors.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    garbage = json.loads((tmp_path / "kept.json").read_text())
    garbage["weights_sha256"] = hashlib.sha256(tensors.read_bytes()).hexdigest()
    description.write_text(json.dumps(garbage))
    with pytest.raises(DataError, match="not a readable safetensors file"):
        ckpt.read_checkpoint(tensors)
    tensors.unlink()
    with pytest.raises(DataError, match="weights file not found"):
        ckpt.read_checkpoint(description)


def test_temporary_files_of_interrupted_pair_writes_are_removed(tmp_path: Path) -> None:
    ours = [".weights_final.safetensors.k2j4x9.tmp", ".weights_final.json.abc.tmp", ".weights_final.pt.x.tmp",
            ".weights_final_ema.pt.y.tmp", ".weights_final_ema.safetensors.z.tmp"]
    for name in [*ours, "weights_final.json.tmp"]:  # the last: not our pattern, kept
        (tmp_path / name).write_bytes(b"\0" * 10)
    assert sorted(name for name, _ in ckpt.remove_stale_temps(tmp_path)) == sorted(ours)
    assert [p.name for p in tmp_path.iterdir()] == ["weights_final.json.tmp"]


def test_the_inference_bench_decodes_with_the_saved_settings(tiny_model: tuple[torch.nn.Module, ModelConfig],
                                                             tmp_path: Path) -> None:
    from rock_dist.perf.infer_bench import bench_infer, saved_postprocess
    from rock_dist.perf.recipes import reference_recipe

    model, cfg = tiny_model
    _save(model, cfg, tmp_path, max_detections=7)

    def per_image(loss_config: LossConfig) -> float:
        rows = bench_infer([reference_recipe()], cfg, loss_config, torch.device("cpu"), batch_sizes=[2], warmup=0,
                           repeats=1, iters=1)
        return rows[0]["detections_per_image"]

    # The bench's "trained" NMS load keeps ~100 boxes per image with the defaults; the saved cap is 7.
    assert per_image(saved_postprocess(str(tmp_path / "weights_final.json"))) == 7
    assert per_image(saved_postprocess("")) > 7
