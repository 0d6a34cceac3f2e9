"""Tests of rank-aggregated evaluation: COCO numbers, auxiliary metrics, gathering, the evaluate command."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pytest
import torch

from rock_dist.data.constants import CLASS_NAMES
from rock_dist.engine.coco import STAT_NAMES, build_detections, build_ground_truth, run_coco_eval
from rock_dist.engine.evaluation import (DETECTIONS_FILE, GROUND_TRUTH_FILE, METRICS_FILE, batch_records,
                                         compute_metrics, deduplicate)
from rock_dist.engine.metrics import aggregate_aux_stats, aux_image_stats

from numerics import HANG_GUARD_S


def _record(image_id: int, gt: list[list[float]], gt_labels: list[int], det: list[list[float]] | None = None,
            scores: list[float] | None = None, det_labels: list[int] | None = None, height: int = 64,
            width: int = 80) -> dict:
    det = det or []
    return {"image_id": image_id, "height": height, "width": width,
            "gt_boxes": np.asarray(gt, dtype=np.float64).reshape(-1, 4),
            "gt_labels": np.asarray(gt_labels, dtype=np.int64),
            "det_boxes": np.asarray(det, dtype=np.float64).reshape(-1, 4),
            "det_scores": np.asarray(scores or [], dtype=np.float64),
            "det_labels": np.asarray(det_labels or [], dtype=np.int64)}


def _random_records(n: int, seed: int) -> list[dict]:
    """Images with 0..4 boxes, noisy detections of them plus random false positives, some images empty."""
    rng = np.random.default_rng(seed)
    records = []
    for image_id in range(n):
        m = int(rng.integers(0, 5))
        xy = rng.uniform(0, 400, (m, 2))
        gt = np.round(np.concatenate([xy, xy + rng.uniform(4, 220, (m, 2))], 1))
        labels = rng.integers(1, 20, m)
        k = int(rng.integers(0, 6))
        fxy = rng.uniform(0, 400, (k, 2))
        det = np.concatenate([np.concatenate([fxy, fxy + rng.uniform(4, 200, (k, 2))], 1),
                              gt + rng.normal(0, 6, gt.shape)])
        det_labels = np.concatenate([rng.integers(1, 20, k), labels])
        records.append(_record(image_id, gt.tolist(), labels.tolist(), det.tolist(),
                               rng.uniform(0.05, 1, len(det)).tolist(), det_labels.tolist(), 480, 640))
    return records


# ----------------------------------------------------------------------------------------------------- COCO
def test_perfect_detections_give_ap_one(tmp_path: Path) -> None:
    records = [
        _record(3, [[1, 2, 30, 40], [10, 10, 60, 50]], [2, 5], [[1, 2, 30, 40], [10, 10, 60, 50]], [0.9, 0.8],
                [2, 5]),
        _record(7, [[0, 0, 79, 63]], [19], [[0, 0, 79, 63]], [0.7], [19]),
    ]
    metrics = compute_metrics(records, CLASS_NAMES, out_dir=tmp_path)
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)
    assert metrics["num_images"] == 2 and metrics["num_gt"] == 3 and metrics["num_detections"] == 3
    gt = json.loads((tmp_path / GROUND_TRUTH_FILE).read_text())
    # docs/evaluation.md: [x0, y0, x1 - x0, y1 - y0], area w*h, iscrowd 0; category ids 1..19 named from the class list.
    first = gt["annotations"][0]
    assert first["bbox"] == [1, 2, 29, 38] and first["area"] == 29 * 38 and first["iscrowd"] == 0
    assert [c["id"] for c in gt["categories"]] == list(range(1, 20))
    assert gt["categories"][9]["name"] == "garbage bin"
    assert [img["id"] for img in gt["images"]] == [3, 7]
    saved = json.loads((tmp_path / METRICS_FILE).read_text())
    assert saved["stats"] == metrics["stats"] and len(saved["stats"]) == 12
    assert len(json.loads((tmp_path / DETECTIONS_FILE).read_text())) == 3


def test_constructed_case_matches_pycocotools_directly(tmp_path: Path) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    records = _random_records(40, seed=1)
    metrics = compute_metrics(records, CLASS_NAMES, out_dir=tmp_path, show_all_cats=True)
    # Reference: pycocotools on the files we wrote, the plain documented way.
    gt = COCO(str(tmp_path / GROUND_TRUTH_FILE))
    dt = gt.loadRes(str(tmp_path / DETECTIONS_FILE))
    reference = COCOeval(gt, dt, "bbox")
    reference.evaluate()
    reference.accumulate()
    reference.summarize()
    assert metrics["stats"] == [float(s) for s in reference.stats]
    assert 0.05 < metrics["AP"] < 0.95  # a non-trivial case
    chair = reference.eval["precision"][:, :, CLASS_NAMES.index("chair"), 0, -1]
    assert metrics["per_category"]["chair"]["AP"] == pytest.approx(float(chair[chair > -1].mean()), abs=0)


def test_image_without_ground_truth_and_image_without_detections() -> None:
    box = [[10, 10, 50, 40]]
    found = _record(1, box, [4], box, [0.9], [4])
    missed = _record(2, box, [4])  # ground truth, no detection
    # Only recall 0.5 is reachable, at precision 1: 51 of the 101 recall points (0.00 .. 0.50).
    metrics = compute_metrics([found, missed], CLASS_NAMES)
    assert metrics["AP"] == pytest.approx(51 / 101)
    # A false positive on an image without ground truth, scored above the true positive, halves precision.
    empty_fp = _record(3, [], [], [[5, 5, 30, 30]], [0.95], [4])
    metrics = compute_metrics([found, empty_fp], CLASS_NAMES)
    assert metrics["AP"] == pytest.approx(0.5)
    assert metrics["num_images_without_gt"] == 1
    # Scored below the true positive it costs nothing at any recall level.
    low_fp = _record(3, [], [], [[5, 5, 30, 30]], [0.1], [4])
    assert compute_metrics([found, low_fp], CLASS_NAMES)["AP"] == pytest.approx(1.0)
    # An image with neither is counted and harmless.
    metrics = compute_metrics([found, _record(4, [], [])], CLASS_NAMES)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["num_images"] == 2


def test_no_detections_at_all_and_no_ground_truth_at_all() -> None:
    records = [_record(i, [[1, 1, 20, 20]], [3]) for i in range(3)]
    metrics = compute_metrics(records, CLASS_NAMES)  # pycocotools' loadRes([]) would raise IndexError
    assert metrics["AP"] == 0.0 and metrics["num_detections"] == 0
    nothing = [_record(i, [], [], [[1, 1, 20, 20]], [0.5], [3]) for i in range(2)]
    metrics = compute_metrics(nothing, CLASS_NAMES)
    assert metrics["AP"] == -1.0 and metrics["num_gt"] == 0  # COCO's "undefined"


def test_faster_coco_eval_backend_gives_the_same_numbers() -> None:
    # faster-coco-eval is part of the test extra, so the comparison always runs.
    records = _random_records(60, seed=2)
    gt, dets = build_ground_truth(records, CLASS_NAMES), build_detections(records)
    a = run_coco_eval(gt, dets, backend="pycocotools")
    b = run_coco_eval(gt, dets, backend="faster_coco_eval")
    # The C++ accumulation may round the last bit of a precision differently; nothing more.
    assert np.allclose(a.stats, b.stats, rtol=0, atol=1e-12)
    for name in CLASS_NAMES:
        pa, pb = a.per_category[name]["AP"], b.per_category[name]["AP"]
        assert (pa is None and pb is None) or abs(pa - pb) <= 1e-12
    empty = run_coco_eval(gt, [], backend="faster_coco_eval")
    assert empty.stats[0] == 0.0


def test_inputs_are_not_modified_and_order_does_not_matter() -> None:
    records = _random_records(25, seed=3)
    gt, dets = build_ground_truth(records, CLASS_NAMES), build_detections(records)
    gt_copy, dets_copy = json.loads(json.dumps(gt)), json.loads(json.dumps(dets))
    first = run_coco_eval(gt, dets)
    assert gt == gt_copy and dets == dets_copy
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    assert compute_metrics(shuffled, CLASS_NAMES)["stats"] == first.stats


# ------------------------------------------------------------------------------------------------- gathering
def test_deduplicate_keeps_each_image_once() -> None:
    per_rank = [[_record(i, [], []) for i in (4, 0, 2)], [_record(i, [], []) for i in (1, 3, 4)]]
    per_rank[1][2]["marker"] = "second copy"
    unique, duplicates = deduplicate(r for rank in per_rank for r in rank)
    assert [r["image_id"] for r in unique] == [0, 1, 2, 3, 4]
    assert duplicates == 1
    assert "marker" not in unique[4]  # the first copy (lowest rank) wins, deterministically


def test_batch_records_map_boxes_to_stored_pixels() -> None:
    # As the pipeline stores them: x / W, y / H of the stored image, float32, padded with label 0.
    px = torch.tensor([[[3, 4, 61, 40], [0, 0, 79, 63]], [[10, 12, 30, 33], [0, 0, 0, 0]]], dtype=torch.float32)
    sizes = torch.tensor([[64, 80], [48, 96]])
    wh = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], 1).float()[:, None]
    batch = {"image_id": torch.tensor([11, 5]), "orig_size": sizes, "boxes": px / wh,
             "labels": torch.tensor([[3, 7], [12, 0]])}
    detections = [{"boxes": torch.tensor([[0.5, 0.25, 1.0, 0.75]]), "scores": torch.tensor([0.6]),
                   "labels": torch.tensor([3])},
                  {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]
    records = batch_records(batch, detections)
    assert records[0]["gt_boxes"].tolist() == [[3, 4, 61, 40], [0, 0, 79, 63]]  # exact after float32
    assert records[1]["gt_boxes"].tolist() == [[10, 12, 30, 33]] and records[1]["gt_labels"].tolist() == [12]
    assert records[0]["det_boxes"].tolist() == [[40.0, 16.0, 80.0, 48.0]]
    assert (records[1]["height"], records[1]["width"]) == (48, 96) and records[1]["det_boxes"].shape == (0, 4)


# ---------------------------------------------------------------------------------------------- aux metrics
def _aux_batch() -> tuple[dict, dict]:
    h, w = 3, 4
    depth = torch.full((3, 1, h, w), 2.0)
    depth[0, 0, 0, 0] = 0.0  # a hole: not counted
    predicted_depth = torch.log(depth.clamp_min(1e-3) * torch.tensor([1.1, 1.3, 1.0]).view(3, 1, 1, 1))
    target_normals = torch.zeros(3, 3, h, w)
    target_normals[:, 2] = 1.0
    angle = torch.deg2rad(torch.tensor([10.0, 25.0, 40.0])).view(3, 1, 1)
    predicted_normals = torch.stack([torch.sin(angle).expand(3, h, w), torch.zeros(3, h, w),
                                     torch.cos(angle).expand(3, h, w)], 1) * 3.0  # unnormalised on purpose
    mask = torch.ones(3, 1, h, w, dtype=torch.bool)
    mask[1, 0, :, :2] = False
    scene_logits = torch.full((3, 27), -5.0)
    scene_logits[0, 4] = 0.0
    scene_logits[1, 7] = 0.0
    scene_logits[2, 7] = 0.0
    outputs = {"scene": scene_logits.log_softmax(1), "depth": predicted_depth, "normals": predicted_normals}
    batch = {"image_id": torch.tensor([0, 1, 2]), "scene": torch.tensor([4, 8, 7]),
             "has_scene": torch.tensor([True, True, False]), "depth": depth,
             "has_depth": torch.tensor([True, True, False]), "normals": target_normals, "normals_mask": mask,
             "has_normals": torch.tensor([True, True, True])}
    return outputs, batch


def test_aux_metrics_on_a_constructed_batch() -> None:
    outputs, batch = _aux_batch()
    records = aux_image_stats(outputs, batch, ("scene", "depth", "normals"))
    metrics = aggregate_aux_stats(records)
    assert metrics["scene_accuracy"] == 0.5 and metrics["num_scene"] == 2  # image 2 has no scene label
    # Image 0: 11 valid pixels off by 10 %; image 1: 12 pixels off by 30 %; image 2 has no depth.
    assert metrics["depth_pixels"] == 23
    assert metrics["depth_abs_rel"] == pytest.approx((11 * 0.1 + 12 * 0.3) / 23, rel=1e-6)
    assert metrics["depth_rmse"] == pytest.approx(math.sqrt((11 * 0.2 ** 2 + 12 * 0.6 ** 2) / 23), rel=1e-6)
    assert metrics["depth_delta1"] == pytest.approx(11 / 23)
    # Normals: 12 pixels at 10°, 6 at 25° (half masked), 12 at 40°.
    assert metrics["normals_pixels"] == 30
    assert metrics["normals_mean"] == pytest.approx((12 * 10 + 6 * 25 + 12 * 40) / 30, abs=1e-3)
    assert metrics["normals_median"] == pytest.approx(25.0, abs=1e-3)
    assert metrics["normals_11_25"] == pytest.approx(12 / 30)
    assert metrics["normals_22_5"] == pytest.approx(12 / 30)
    assert metrics["normals_30"] == pytest.approx(18 / 30)


def test_aux_metrics_only_for_trained_tasks_and_split_independent() -> None:
    outputs, batch = _aux_batch()
    only_scene = aggregate_aux_stats(aux_image_stats(outputs, batch, ("scene",)))
    assert set(only_scene) == {"scene_accuracy", "num_scene"}
    whole = aggregate_aux_stats(aux_image_stats(outputs, batch, ("scene", "depth", "normals")))
    # The same images seen as two batches (as two ranks would) give bit-identical numbers.
    parts = []
    for index in ([2], [0, 1]):
        sub_out = {k: v[index] for k, v in outputs.items()}
        sub_batch = {k: v[index] for k, v in batch.items()}
        parts.extend(aux_image_stats(sub_out, sub_batch, ("scene", "depth", "normals")))
    order = [1, 2, 0]  # records back in image-id order
    assert aggregate_aux_stats([parts[i] for i in order]) == whole
    assert set(STAT_NAMES) <= set(compute_metrics([_record(0, [], [])], CLASS_NAMES))


# ------------------------------------------------------------------------------------------ evaluate(), end to end
class OracleDetector(torch.nn.Module):
    """Stands in for ROCKDetector: 'detects' the ground truth of the batch the loader just gave out.

    With `perfect=False` it misses, shifts and invents boxes and errs on the auxiliary tasks in ways fixed by the
    image id, so the metrics are non-trivial (0 < AP < 1) yet cannot depend on how images were batched or split
    across ranks — what the 1-vs-2-process comparison needs (a real network's last bits depend on the batch
    composition and thread count on CPU).
    """

    tasks = ("scene", "depth", "normals")

    def __init__(self, perfect: bool) -> None:
        super().__init__()
        self.perfect = perfect
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives evaluate() a device to find
        self.current: Mapping[str, torch.Tensor] | None = None

    def feed(self, loader: Any) -> Iterator[Mapping[str, torch.Tensor]]:
        for batch in loader:
            self.current = batch
            yield batch

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b = self.current
        assert b is not None and b["images"].shape[0] == images.shape[0]
        ids = b["image_id"].double()
        scene = torch.full((len(ids), 27), -10.0)
        wrong = (ids % 3 == 0) & ~torch.tensor(self.perfect)
        scene[torch.arange(len(ids)), torch.where(wrong, (b["scene"] + 1) % 27, b["scene"].clamp_min(0))] = 0.0
        factor = 1.0 if self.perfect else (1.0 + 0.15 * (ids % 4)).view(-1, 1, 1, 1)
        depth = torch.log(b["depth"].clamp_min(1e-3) * factor)
        normals = b["normals"] + (0.0 if self.perfect else 0.1 * (ids % 5).view(-1, 1, 1, 1)) * torch.tensor(
            [1.0, 0.0, 0.0]).view(1, 3, 1, 1)
        return {"scene": scene.log_softmax(1), "depth": depth.float(), "normals": normals.float(),
                "loc": torch.zeros(len(ids), 1, 4), "conf": torch.zeros(len(ids), 1, 20)}

    def postprocess(self, outputs: dict[str, torch.Tensor], score_threshold: float = 0.05, nms_iou: float = 0.3,
                    max_detections: int = 100) -> list[dict[str, torch.Tensor]]:
        b = self.current
        assert b is not None
        out = []
        for i, image_id in enumerate(b["image_id"].tolist()):
            keep = b["labels"][i] > 0
            boxes, labels = b["boxes"][i][keep].clone(), b["labels"][i][keep].clone()
            scores = torch.linspace(0.9, 0.6, len(boxes)) if len(boxes) else torch.zeros(0)
            if not self.perfect:
                boxes[:, [0, 2]] += 0.02 * (image_id % 3)  # some boxes too far off for the strict IoU levels
                if image_id % 4 == 0 and len(boxes):
                    boxes, labels, scores = boxes[:-1], labels[:-1], scores[:-1]  # a miss
                fake = torch.tensor([[0.1, 0.1, 0.3, 0.4]])
                boxes = torch.cat([boxes, fake])
                labels = torch.cat([labels, torch.tensor([1 + image_id % 19])])
                scores = torch.cat([scores, torch.tensor([0.5 + 0.1 * (image_id % 5)])])  # a false positive
            out.append({"boxes": boxes.clamp(0, 1), "scores": scores, "labels": labels})
        return out


def _oracle_metrics(split_dir: Path, accelerator: Any, *, perfect: bool, batch_size: int,
                    out_dir: Path | None = None) -> dict[str, Any]:
    from rock_dist.config import LossConfig
    from rock_dist.data.manifest import load_manifest
    from rock_dist.data.loader_spec import EvalLoaderSpec
    from rock_dist.data.pipeline import make_eval_loader
    from rock_dist.engine.evaluation import evaluate

    manifest = load_manifest(split_dir)
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    loader = make_eval_loader(EvalLoaderSpec(str(split_dir), image_size=(64, 80), target_size=(12, 16),
                                             batch_size=batch_size, num_workers=0, rank=rank, world_size=world))
    model = OracleDetector(perfect)
    return evaluate(model, model.feed(loader), accelerator, loss_config=LossConfig(), out_dir=out_dir,
                    show_all_cats=True, class_names=manifest.class_names, expected_images=manifest.num_samples)


def test_evaluate_perfect_detections_through_the_pipeline(shard_dir: Path, tmp_path: Path, nyu_files: Any) -> None:
    metrics = _oracle_metrics(shard_dir / "test", None, perfect=True, batch_size=3, out_dir=tmp_path)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["scene_accuracy"] == 1.0 and metrics["depth_delta1"] == 1.0
    assert metrics["depth_abs_rel"] < 1e-6 and metrics["normals_mean"] < 0.1
    # The ground truth written is the generator's, box for box: COCO [x0, y0, x1 - x0, y1 - y0], area w*h.
    gt = json.loads((tmp_path / GROUND_TRUTH_FILE).read_text())
    test_ids = sorted(i for i, t in nyu_files.ground_truth.items() if t["split"] == "test")
    assert [img["id"] for img in gt["images"]] == test_ids
    expected = sorted((i, lab, (b[0], b[1], b[2] - b[0], b[3] - b[1]))
                      for i in test_ids for b, lab in zip(nyu_files.ground_truth[i]["boxes"],
                                                          nyu_files.ground_truth[i]["labels"]))
    found = sorted((a["image_id"], a["category_id"], tuple(a["bbox"])) for a in gt["annotations"])
    assert found == expected
    assert all(a["area"] == a["bbox"][2] * a["bbox"][3] and a["iscrowd"] == 0 for a in gt["annotations"])


def test_evaluate_drops_duplicates_and_reports_missing_images(shard_dir: Path) -> None:
    from rock_dist.config import LossConfig
    from rock_dist.data.loader_spec import EvalLoaderSpec
    from rock_dist.data.pipeline import make_eval_loader
    from rock_dist.engine.evaluation import evaluate
    from rock_dist.errors import DataError

    batches = list(make_eval_loader(EvalLoaderSpec(str(shard_dir / "test"), image_size=(64, 80), target_size=(12, 16),
                                    batch_size=4, num_workers=0, rank=0, world_size=1)))
    n = sum(len(b["image_id"]) for b in batches)
    model = OracleDetector(perfect=True)
    # A loader that hands out the first batch twice (as a padding sampler would): counted once.
    metrics = evaluate(model, model.feed(batches + batches[:1]), None, loss_config=LossConfig(),
                       class_names=CLASS_NAMES, expected_images=n)
    assert metrics["num_images"] == n and metrics["num_duplicates"] == len(batches[0]["image_id"])
    assert metrics["AP"] == pytest.approx(1.0)
    with pytest.raises(DataError, match="distinct images"):
        evaluate(model, model.feed(batches[1:]), None, loss_config=LossConfig(), class_names=CLASS_NAMES,
                 expected_images=n)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_evaluate_reads_the_safetensors_pair_and_its_postprocessing(shard_dir: Path, tmp_path: Path) -> None:
    from rock_dist.config import LossConfig, ModelConfig, TrainConfig
    from rock_dist.data.constants import SCENE_TYPES
    from rock_dist.engine.checkpoint import save_weights
    from rock_dist.evaluate import main
    from rock_dist.model.builder import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", pretrained="none", image_size=(128, 160))
    model = build_model(cfg).eval()
    with torch.no_grad():  # class scores near 1/20 instead of 1/120, so that decoding keeps boxes at 0.05
        for name, param in model.named_parameters():
            if ".conf." in name and name.endswith("bias"):
                param.zero_()
    pt = save_weights(tmp_path / "weights_final.pt", model, cfg, list(CLASS_NAMES), list(SCENE_TYPES),
                      train_config=TrainConfig(loss=LossConfig(score_threshold=0.5)))

    def run(weights: Path, name: str, *flags: str) -> tuple[dict, list]:
        out = tmp_path / name
        assert main([str(weights), "--test_path", str(shard_dir / "test"), "--coco_json_save_path", str(out),
                     "--device", "cpu", "--no_verbose", "--num_workers", "0", *flags]) == 0
        metrics = json.loads((out / METRICS_FILE).read_text())
        metrics.pop("seconds", None)
        return metrics, json.loads((out / DETECTIONS_FILE).read_text())

    saved_metrics, saved_detections = run(pt.with_suffix(".safetensors"), "saved")
    assert saved_detections and min(d["score"] for d in saved_detections) > 0.5  # the saved threshold
    assert run(pt, "pt") == (saved_metrics, saved_detections)  # the .pt of the pair: the same result
    flag_metrics, flag_detections = run(pt.with_suffix(".safetensors"), "flag", "--score_threshold", "0.05")
    assert len(flag_detections) > len(saved_detections) and min(d["score"] for d in flag_detections) <= 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(weights: str, split_dir: str, out_dir: str) -> int:
    """Run in each launched process: the evaluate command on a real model, then evaluate() with the oracle."""
    from rock_dist.evaluate import main

    main([weights, "--test_path", split_dir, "--device", "cpu", "--batch_size", "4", "--num_workers", "0",
          "--coco_json_save_path", str(Path(out_dir) / "real"), "--no_verbose", "--show_all_cats"])
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # the state evaluate's main() set up: same process group
    # Batches of 3 over shards of 4: 1 and 2 processes see different batch compositions.
    metrics = _oracle_metrics(Path(split_dir), accelerator, perfect=False, batch_size=3,
                              out_dir=Path(out_dir) / "oracle")
    if accelerator.is_main_process:
        with open(Path(out_dir) / "oracle_rank_view.json", "w") as f:
            json.dump({"world": accelerator.num_processes}, f)
    # Every rank must have received the main process's metrics.
    with open(Path(out_dir) / f"oracle_metrics_rank{accelerator.process_index}.json", "w") as f:
        json.dump({k: v for k, v in metrics.items() if k != "seconds"}, f)
    accelerator.wait_for_everyone()
    return 0


def _comparable(path: Path) -> Any:
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        for key in ("seconds", "num_processes", "images_per_process"):
            data.pop(key, None)
    return data


@pytest.mark.slow  # real multi-process launch: CI runs it, `-m "not slow"` skips it
def test_one_and_two_processes_give_identical_metrics(shard_dir: Path, tmp_path: Path) -> None:
    from rock_dist.engine.checkpoint import save_weights
    from rock_dist.model.builder import build_model
    from rock_dist.config import ModelConfig
    from rock_dist.data.constants import SCENE_TYPES

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", pretrained="none", image_size=(128, 160))
    weights = tmp_path / "weights.pt"
    save_weights(weights, build_model(cfg).eval(), cfg, list(CLASS_NAMES), list(SCENE_TYPES))
    split = shard_dir / "test"
    # One thread per process in both runs: CPU convolutions sum in a thread-count-dependent order.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("ACCELERATE_USE_CPU", None)
    one, two = tmp_path / "one", tmp_path / "two"
    script = str(Path(__file__).resolve())
    single = subprocess.run([sys.executable, script, str(weights), str(split), str(one)], env=env,
                            capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), script, str(weights), str(split), str(two)]
    double = subprocess.run(launch, env={**env, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                            timeout=HANG_GUARD_S)
    assert double.returncode == 0, double.stderr[-3000:]

    manifest = json.loads((split / "manifest.json").read_text())
    for run, world in ((one, 1), (two, 2)):
        for kind in ("real", "oracle"):
            metrics = json.loads((run / kind / METRICS_FILE).read_text())
            assert metrics["num_processes"] == world  # a launch that started unrelated processes would say 1
            assert len(metrics["images_per_process"]) == world and min(metrics["images_per_process"]) > 0
            assert sum(metrics["images_per_process"]) == manifest["num_samples"]
            # Every image exactly once in what was evaluated.
            gt_ids = [img["id"] for img in json.loads((run / kind / GROUND_TRUTH_FILE).read_text())["images"]]
            assert gt_ids == sorted(manifest["image_ids"])
    for kind in ("real", "oracle"):
        for name in (METRICS_FILE, GROUND_TRUTH_FILE, DETECTIONS_FILE):
            assert _comparable(one / kind / name) == _comparable(two / kind / name), (kind, name)
    oracle = _comparable(two / "oracle" / METRICS_FILE)
    assert 0.05 < oracle["AP"] < 0.95 and 0 < oracle["scene_accuracy"] < 1 and 0 < oracle["depth_delta1"] < 1
    # Both ranks returned the main process's numbers.
    assert _comparable(two / "oracle_metrics_rank0.json") == _comparable(two / "oracle_metrics_rank1.json")
    assert json.loads((two / "oracle_rank_view.json").read_text())["world"] == 2


if __name__ == "__main__":  # worker mode for the multi-process test (run by `accelerate launch`)
    sys.exit(_worker(*sys.argv[1:4]))
