"""`python -m rock_dist.export --format onnx`: the graph of a tiny random model (resnet18, 64x80 input, CPU) run with
onnxruntime against PyTorch for two batch sizes (every output within ONNX_TOLERANCE), decoded with rock_dist's
post-processing to the same detections, and one clear error for files that are not rock_dist weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rock_dist.config import LossConfig, ModelConfig, TrainConfig, resolve_postprocess
from rock_dist.data.constants import CLASS_NAMES, SCENE_TYPES
from rock_dist.errors import ConfigError, DataError
from rock_dist.export import ONNX_TOLERANCE, main
from rock_dist.model.postprocess import postprocess_detections
from rock_dist.model.priors import make_priors

from numerics import HANG_GUARD_S

IMAGE_SIZE = (64, 80)
# Few candidates per class (~4 per image and class above 0.3), so no NMS decision sits within rounding distance of
# the IoU threshold; 20 per image makes the top-k cut part of what is compared.
SETTINGS = {"score_threshold": 0.3, "nms_iou": 0.45, "max_detections": 20}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(weights_final.safetensors, its ONNX export) of a random ROCK model with non-trivial BatchNorm statistics."""
    from rock_dist.engine.checkpoint import save_weights
    from rock_dist.model.builder import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", pretrained="none", image_size=IMAGE_SIZE)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".conf." in name and name.endswith("bias"):
                param.zero_()  # class scores near 1/20 rather than 1/120: detections above the threshold
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)  # the export folds BatchNorms: make folding do something
    root = tmp_path_factory.mktemp("export")
    weights = save_weights(root / "weights_final.pt", model, cfg, list(CLASS_NAMES), list(SCENE_TYPES),
                           train_config=TrainConfig(loss=LossConfig(**SETTINGS)), iterations=3)
    portable = weights.with_suffix(".safetensors")
    onnx_path = root / "model.onnx"
    assert main([str(portable), "--format", "onnx", "--out", str(onnx_path)]) == 0  # with its own --check
    return portable, onnx_path


def test_onnx_outputs_match_pytorch_for_two_batch_sizes(exported: tuple[Path, Path]) -> None:
    import onnxruntime

    from rock_dist.engine.checkpoint import load_model

    weights, onnx_path = exported
    model, cfg, meta = load_model(weights)  # unfolded BatchNorms: the export's folding is compared as well
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["loc", "conf", "scene", "depth", "normals", "priors"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a symbolic (dynamic) batch axis
    settings = resolve_postprocess(meta["postprocess"])
    for batch in (1, 3):
        images = torch.randn(batch, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(batch))
        got = dict(zip(names, (torch.from_numpy(a) for a in session.run(None, {"images": images.numpy()}))))
        with torch.no_grad():
            want = model(images)
        for name in names[:-1]:
            assert got[name].shape == want[name].shape, (name, batch)
            # ONNX_TOLERANCE (rock_dist/export.py) is derived there: two float32 evaluations of the same network in
            # different summation orders stay ~3e-5 of each output's scale apart (measured ~1e-6); a wrong layout,
            # bias or batch handling is of the order of the scale itself.
            error = float((got[name] - want[name]).abs().max() / want[name].abs().max())
            assert error <= ONNX_TOLERANCE, (name, batch, error)
        assert torch.equal(got["priors"], make_priors(IMAGE_SIZE, "resnet18"))

        # Decoding the ONNX outputs with our post-processing and the settings saved with the weights gives the
        # detections of the PyTorch model: same count, labels and order; boxes and scores move by at most the raw
        # tolerance carried through the softmax and the box coding (scores ≤ 2 × 1e-4 × |logit| ≈ 2e-3 of a unit
        # score, boxes likewise in normalised coordinates), measured ~1e-6.
        kwargs = dict(score_threshold=settings.score_threshold, nms_iou=settings.nms_iou,
                      max_detections=settings.max_detections)
        from_onnx = postprocess_detections(got["loc"], got["conf"], got["priors"], **kwargs)
        from_torch = model.postprocess(want, **kwargs)
        assert [len(d["labels"]) for d in from_torch] == [SETTINGS["max_detections"]] * batch  # something to compare
        for a, b in zip(from_onnx, from_torch):
            assert torch.equal(a["labels"], b["labels"])
            torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=2e-3)
            torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=2e-3)


def test_the_graph_carries_the_weights_description(exported: tuple[Path, Path]) -> None:
    import onnx

    weights, onnx_path = exported
    proto = onnx.load(str(onnx_path), load_external_data=False)
    metadata = {p.key: p.value for p in proto.metadata_props}
    description = json.loads(metadata["rock_dist"])
    assert description["class_names"] == list(CLASS_NAMES) and description["scene_types"] == list(SCENE_TYPES)
    assert {k: description["postprocess"][k] for k in SETTINGS} == SETTINGS
    assert description["provenance"]["iterations"] == 3 and description["model_config"]["image_size"] == [64, 80]
    assert description["input"]["shape"] == ["batch", 3, 64, 80] and len(description["input"]["mean"]) == 3
    assert description["outputs"] == ["loc", "conf", "scene", "depth", "normals", "priors"]


def test_files_that_are_not_rock_dist_weights_are_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\x00\x01 not a model at all")
    result = subprocess.run([sys.executable, "-m", "rock_dist.export", str(tmp_path / "model.bin"), "--format",
                             "onnx"], capture_output=True, text=True, timeout=HANG_GUARD_S,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.bin" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "model.onnx").exists()
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")  # someone else's torch file
    with pytest.raises(DataError, match="other.pt: not a rock_dist weights file"):
        main([str(tmp_path / "other.pt"), "--format", "onnx"])
    (tmp_path / "lonely.safetensors").write_bytes(b"")  # a safetensors file without its description
    with pytest.raises(DataError, match="lonely.json is missing"):
        main([str(tmp_path / "lonely.safetensors")])
    with pytest.raises(ConfigError, match="--opset 17"):
        main([str(tmp_path / "other.pt"), "--opset", "17"])
