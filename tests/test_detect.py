"""Tests of `rock_dist.detect`, `rock_dist.create_image_folder` and the pictures of `rock_dist.engine.visualize`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rock_dist.config import ModelConfig
from rock_dist.data.constants import CLASS_NAMES, SCENE_TYPES
from rock_dist.engine.visualize import colorize_depth, draw_detections, normals_to_rgb, scene_picture
from rock_dist.errors import ConfigError

IMAGE_SIZE = (128, 160)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ROCK model (resnet18, 128x160 input, random weights) saved as a final weights file."""
    from rock_dist.engine.checkpoint import save_weights
    from rock_dist.model.builder import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", pretrained="none", image_size=IMAGE_SIZE)
    model = build_model(cfg).eval()
    path = tmp_path_factory.mktemp("weights") / "weights.pt"
    save_weights(path, model, cfg, list(CLASS_NAMES), list(SCENE_TYPES))
    return path


def _image_dir(root: Path) -> Path:
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(images / "a.jpg", quality=95)
    Image.fromarray(rng.integers(0, 255, (50, 90, 3), dtype=np.uint8)).save(images / "b.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return images


def test_detect_writes_pictures_and_skips_a_corrupt_file(weights: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from rock_dist.detect import DETECTIONS_JSON, main

    images = _image_dir(tmp_path)
    out = tmp_path / "out"
    assert main([str(weights), "--image_path", str(images), "--detection_output_path", str(out),
                 "--scene_output_path", str(tmp_path / "scene"), "--depth_output_path", str(tmp_path / "depth"),
                 "--normals_output_path", str(tmp_path / "normals"), "--device", "cpu", "--conf_threshold", "0.3",
                 "--batch_size", "2", "--get_throughput", "--picture_min_side", "100"]) == 0
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "broken.jpg" in captured.err  # reports of bad input go to stderr
    assert "images/s" in captured.out
    summary = json.loads((out / DETECTIONS_JSON).read_text())
    assert summary["skipped"] == ["broken.jpg"]
    assert sorted(summary["images"]) == ["a.jpg", "b.png"]
    for name, stem, (h, w), factor in (("a.jpg", "a", (64, 80), 2), ("b.png", "b", (50, 90), 2)):
        for folder in (out, tmp_path / "scene", tmp_path / "depth", tmp_path / "normals"):
            with Image.open(folder / f"{stem}.png") as picture:
                # Box pictures enlarged to a shorter side >= 100 by a whole factor; the rest at the original size.
                scale = factor if folder == out else 1
                assert picture.size == (w * scale, h * scale), folder
        entry = summary["images"][name]
        assert (entry["height"], entry["width"]) == (h, w)
        assert entry["scene"]["name"] in SCENE_TYPES
        boxes = np.asarray(entry["boxes"]).reshape(-1, 4)
        assert len(boxes) == len(entry["scores"]) == len(entry["labels"])
        assert all(s >= 0.3 for s in entry["scores"])
        # Boxes are in the original image's pixels, not the 128x160 network input's.
        assert (boxes >= -1e-6).all() and (boxes[:, [0, 2]] <= w + 1e-3).all() and (boxes[:, [1, 3]] <= h + 1e-3).all()
    assert not (out / "broken.png").exists()


def test_detect_boxes_are_the_model_boxes_scaled_back(weights: Path, tmp_path: Path) -> None:
    from rock_dist.data.batch import prepare_batch
    from rock_dist.detect import DETECTIONS_JSON, main, read_image, resize_to_input
    from rock_dist.engine.checkpoint import load_model

    images = _image_dir(tmp_path)
    out = tmp_path / "out"
    assert main([str(weights), "--image_path", str(images), "--detection_output_path", str(out),
                 "--device", "cpu"]) == 0
    model, _, _ = load_model(weights, "cpu")
    original = read_image(images / "b.png")
    batch = prepare_batch({"images": resize_to_input(original, IMAGE_SIZE)[None]}, torch.device("cpu"))
    with torch.no_grad():
        expected = model.postprocess(model(batch["images"]), score_threshold=0.4)[0]
    scale = torch.tensor([90, 50, 90, 50])
    entry = json.loads((out / DETECTIONS_JSON).read_text())["images"]["b.png"]
    assert len(entry["boxes"]) == len(expected["boxes"])
    assert np.allclose(entry["boxes"], (expected["boxes"] * scale).numpy(), atol=0.01)


def test_detect_checks_the_flags_against_the_checkpoint(weights: Path, tmp_path: Path) -> None:
    from rock_dist.detect import main

    images = _image_dir(tmp_path)
    with pytest.raises(ConfigError, match="--no_rock"):
        main([str(weights), "--image_path", str(images), "--detection_output_path", str(tmp_path / "o"),
              "--device", "cpu", "--no_rock"])
    with pytest.raises(ConfigError, match="--aux_tasks"):
        main([str(weights), "--image_path", str(images), "--detection_output_path", str(tmp_path / "o"),
              "--device", "cpu", "--aux_tasks", "scene", "depth"])


def _detections(weights: Path, images: Path, out: Path, *flags: str) -> dict:
    from rock_dist.detect import DETECTIONS_JSON, main

    assert main([str(weights), "--image_path", str(images), "--detection_output_path", str(out), "--device", "cpu",
                 *flags]) == 0
    return json.loads((out / DETECTIONS_JSON).read_text())


def test_detect_reads_the_safetensors_pair_and_its_postprocessing(weights: Path, tmp_path: Path) -> None:
    from rock_dist.config import LossConfig, TrainConfig
    from rock_dist.engine.checkpoint import load_model, save_weights

    images = _image_dir(tmp_path)
    model, cfg, _ = load_model(weights, "cpu")
    # The same model saved with other post-processing: a low threshold and at most 3 boxes per image.
    saved = save_weights(tmp_path / "low" / "weights_final.pt", model, cfg, list(CLASS_NAMES), list(SCENE_TYPES),
                         train_config=TrainConfig(loss=LossConfig(conf_threshold=0.01, max_detections=3)))
    portable = saved.with_suffix(".safetensors")
    default = _detections(weights, images, tmp_path / "default")
    assert (default["conf_threshold"], default["nms_iou"], default["max_detections"]) == (0.4, 0.3, 100)
    low = _detections(portable, images, tmp_path / "low_out")
    assert (low["conf_threshold"], low["max_detections"]) == (0.01, 3)
    counts = [len(entry["scores"]) for entry in low["images"].values()]
    assert counts == [3, 3]  # this random model has many boxes above 0.01, and the saved cap keeps 3
    assert all(s >= 0.01 for entry in low["images"].values() for s in entry["scores"])
    assert counts != [len(entry["scores"]) for entry in default["images"].values()]
    # Flags given on the command line win over the saved settings, and then the output is the default file's.
    flagged = _detections(portable, images, tmp_path / "flagged", "--conf_threshold", "0.4", "--max_detections", "100")
    assert flagged["images"] == default["images"]
    # The .pt of the pair gives what the safetensors file gives.
    assert _detections(saved, images, tmp_path / "low_pt")["images"] == low["images"]


# ----------------------------------------------------------------------------------------------- pictures
def test_pictures_are_cpu_uint8_and_do_not_touch_the_input() -> None:
    image = torch.full((3, 64, 80), 100, dtype=torch.uint8)
    before = image.clone()
    drawn = draw_detections(image, torch.tensor([[5.0, 6.0, 40.0, 50.0], [-10.0, 0.0, 200.0, 90.0]]),
                            torch.tensor([5, 19]), torch.tensor([0.9, 0.5]), CLASS_NAMES)
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, 64, 80) and drawn.device.type == "cpu"
    assert torch.equal(image, before) and not torch.equal(drawn, image)
    assert (drawn[:, 6, 20] != 100).any()  # the top edge of the first box is drawn
    # Small images are enlarged by a whole factor (ceil(200 / 64) = 4) and the boxes move with them.
    large = draw_detections(image, torch.tensor([[5.0, 6.0, 40.0, 50.0]]), torch.tensor([5]), torch.tensor([0.9]),
                            CLASS_NAMES, min_side=200)
    assert large.shape == (3, 256, 320)
    assert (large[:, 24, 100] != 100).any() and (large[:, 240, 300] == 100).all()
    assert torch.equal(draw_detections(image, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), CLASS_NAMES,
                                       min_side=64), image)
    depth = colorize_depth(torch.linspace(0.5, 8.0, 40).repeat(30, 1))
    assert depth.shape == (3, 30, 40) and depth.dtype == torch.uint8
    assert depth[:, 0, 0].float().sum() > depth[:, 0, -1].float().sum()  # near is brighter than far
    normals = torch.zeros(3, 2, 2)
    normals[2] = 2.0  # facing the camera, unnormalised
    rgb = normals_to_rgb(normals, mask=torch.tensor([[True, True], [True, False]]))
    assert rgb[:, 0, 0].tolist() == [128, 128, 255] and rgb[:, 1, 1].tolist() == [0, 0, 0]
    picture = scene_picture(image, "living_room", 0.8)
    assert picture.shape == image.shape and not torch.equal(picture[:, :5], image[:, :5])


# ------------------------------------------------------------------------------------------ image folder
def test_create_image_folder_exports_every_image(shard_dir: Path, tmp_path: Path) -> None:
    from rock_dist.create_image_folder import main
    from rock_dist.data.manifest import load_manifest

    manifest = load_manifest(shard_dir / "test")
    assert main(["--data_path", str(shard_dir / "test"), "--save_path", str(tmp_path / "images")]) == 0
    files = sorted((tmp_path / "images").iterdir())
    assert len(files) == manifest.num_samples
    assert sorted(int(f.stem.rsplit("_", 1)[1]) for f in files) == sorted(manifest.image_ids)
    h, w = manifest.image_size
    for f in files:
        with Image.open(f) as picture:
            assert picture.size == (w, h)
