"""COCO-format ground truth and detections, and one COCOeval run with a choice of backend.

Called by `rock_dist.engine.evaluation.evaluate` on the main process after the per-image records of all ranks have
been gathered and de-duplicated. Kept free of any distributed or model code so that the exact COCO numbers can be
tested on constructed inputs and compared against pycocotools called directly.

Conventions (docs/evaluation.md): ground-truth boxes come from the shards as inclusive pixel xyxy and become COCO
`[x0, y0, x1 - x0, y1 - y0]` with `area = w * h` and `iscrowd = 0`; category ids are 1..C in the order of the
manifest's class names. Every evaluated image is listed in `images`, also those without any box, so detections
on them count as false positives.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

CocoBackend = Literal["pycocotools", "faster_coco_eval"]
BACKENDS: tuple[str, ...] = ("pycocotools", "faster_coco_eval")

# The 12 numbers of COCOeval.summarize() for boxes, in its order.
STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)


@dataclass
class CocoResult:
    """Outcome of one COCOeval run.

    `stats` are the 12 summary numbers (-1 where COCOeval finds nothing to average, e.g. no ground truth at all);
    `per_category` maps class name -> {"AP", "AP50", "num_gt", "num_det"} with None for an AP that is undefined
    because the class has no ground truth; `summary` is COCOeval's printed table.
    """

    stats: list[float]
    per_category: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    summary: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: value for name, value in zip(STAT_NAMES, self.stats)}
        out["stats"] = list(self.stats)
        out["per_category"] = self.per_category
        return out


def categories(class_names: Sequence[str]) -> list[dict[str, Any]]:
    """COCO `categories`: id i + 1 for class_names[i]."""
    return [{"id": i + 1, "name": str(name), "supercategory": "object"} for i, name in enumerate(class_names)]


def xyxy_to_coco(boxes: np.ndarray) -> np.ndarray:
    """K x 4 pixel xyxy -> K x 4 COCO xywh with w = x1 - x0, h = y1 - y0 (float64)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def build_ground_truth(images: Iterable[Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, Any]:
    """COCO ground-truth dataset from per-image records.

    Each record has `image_id` (int), `height`, `width` (stored image size) and `gt_boxes` (M x 4 pixel xyxy),
    `gt_labels` (M ints 1..C). Records must already be unique by image id; they are listed in image-id order and
    annotation ids are assigned 1, 2, ... in that order, so the file is identical however the images were split
    across ranks.
    """
    records = sorted(images, key=lambda r: int(r["image_id"]))
    num_classes = len(class_names)
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for record in records:
        image_id = int(record["image_id"])
        coco_images.append({"id": image_id, "width": int(record["width"]), "height": int(record["height"]),
                            "file_name": str(record.get("file_name", f"{image_id}"))})
        labels = np.asarray(record["gt_labels"], dtype=np.int64).reshape(-1)
        boxes = xyxy_to_coco(record["gt_boxes"])
        if len(labels) != len(boxes):
            raise ValueError(f"image {image_id}: {len(boxes)} ground-truth boxes but {len(labels)} labels")
        for (x, y, w, h), label in zip(boxes.tolist(), labels.tolist()):
            if not 1 <= label <= num_classes:
                raise ValueError(f"image {image_id}: ground-truth label {label} outside 1..{num_classes}")
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    return {"info": {"description": "rock_dist evaluation ground truth"}, "images": coco_images,
            "annotations": annotations, "categories": categories(class_names)}


def build_detections(images: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """COCO result list from per-image records with `det_boxes` (K x 4 pixel xyxy), `det_scores`, `det_labels`.

    Ordered by image id, then as the records list them (the model's score order), so that ties between equal
    scores are broken the same way whatever the rank layout was.
    """
    detections: list[dict[str, Any]] = []
    for record in sorted(images, key=lambda r: int(r["image_id"])):
        image_id = int(record["image_id"])
        boxes = xyxy_to_coco(record["det_boxes"])
        scores = np.asarray(record["det_scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(record["det_labels"], dtype=np.int64).reshape(-1)
        for (x, y, w, h), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            detections.append({"image_id": image_id, "category_id": int(label), "bbox": [x, y, w, h],
                               "score": score})
    return detections


def _load_backend(backend: str) -> tuple[Any, Any]:
    """(COCO class, COCOeval class) of a backend; ImportError with the install hint if it is missing."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError as err:
            raise ImportError("the faster_coco_eval backend needs `pip install faster-coco-eval` "
                              "(or `pip install rock_dist[fast-eval]`)") from err
        return COCO, COCOeval_faster
    raise ValueError(f"unknown COCO backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def _coco_from_dict(coco_cls: Any, dataset: dict[str, Any]) -> Any:
    # Both backends accept an in-memory dataset this way; it avoids a temporary file.
    coco = coco_cls()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _mean_valid(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else None


def run_coco_eval(ground_truth: dict[str, Any], detections: list[dict[str, Any]], *,
                  backend: str = "pycocotools") -> CocoResult:
    """Run COCOeval (bbox) once and return the 12 stats plus per-category AP and AP50.

    `detections` may be empty: pycocotools' `loadRes([])` fails, so an empty result set is built directly (every
    class with ground truth then scores AP 0). The inputs are not modified.
    """
    coco_cls, eval_cls = _load_backend(backend)
    log = io.StringIO()
    # Both libraries print progress chatter and the summary table to stdout; keep the console ours.
    with contextlib.redirect_stdout(log):
        coco_gt = _coco_from_dict(coco_cls, _deep_copy_dataset(ground_truth))
        if detections:
            # loadRes adds keys (id, area, segmentation) to the dicts it gets: hand it copies.
            coco_dt = coco_gt.loadRes([dict(d, bbox=list(d["bbox"])) for d in detections])
        else:
            coco_dt = _coco_from_dict(coco_cls, {"images": list(ground_truth["images"]), "annotations": [],
                                                 "categories": list(ground_truth["categories"])})
        evaluator = eval_cls(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        summary_start = log.tell()
        evaluator.summarize()
    summary = log.getvalue()[summary_start:]
    stats = [float(s) for s in np.asarray(evaluator.stats, dtype=np.float64).reshape(-1)[:len(STAT_NAMES)]]

    # precision: T (IoU thresholds) x R (recall points) x K (categories) x A (areas) x M (max dets), -1 = undefined.
    precision = np.asarray(evaluator.eval["precision"])
    cat_ids = list(evaluator.params.catIds)
    iou_thrs = np.asarray(evaluator.params.iouThrs)
    iou50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    num_gt: dict[int, int] = {}
    for ann in ground_truth["annotations"]:
        num_gt[ann["category_id"]] = num_gt.get(ann["category_id"], 0) + 1
    num_det: dict[int, int] = {}
    for det in detections:
        num_det[det["category_id"]] = num_det.get(det["category_id"], 0) + 1
    per_category: dict[str, dict[str, float | int | None]] = {}
    for cat in ground_truth["categories"]:
        k = cat_ids.index(cat["id"])
        per_category[cat["name"]] = {
            "AP": _mean_valid(precision[:, :, k, 0, -1]),
            "AP50": _mean_valid(precision[iou50, :, k, 0, -1]),
            "num_gt": num_gt.get(cat["id"], 0),
            "num_det": num_det.get(cat["id"], 0),
        }
    return CocoResult(stats=stats, per_category=per_category, summary=summary)


def _deep_copy_dataset(dataset: dict[str, Any]) -> dict[str, Any]:
    """Copy of a COCO dataset deep enough that createIndex and evaluation cannot alter the caller's dicts."""
    return {
        **dataset,
        "images": [dict(img) for img in dataset["images"]],
        "annotations": [dict(ann, bbox=list(ann["bbox"])) for ann in dataset["annotations"]],
        "categories": [dict(cat) for cat in dataset["categories"]],
    }


def format_percent(value: float | None) -> str:
    """COCO number as a percentage for tables; undefined (-1 / None / NaN) shows as '-'."""
    if value is None or value < 0 or math.isnan(value):
        return "-"
    return f"{100 * value:.1f}"


__all__ = ["BACKENDS", "STAT_NAMES", "CocoBackend", "CocoResult", "categories", "xyxy_to_coco",
           "build_ground_truth", "build_detections", "run_coco_eval", "format_percent"]
