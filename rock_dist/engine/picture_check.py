"""How many of the boxes the pictures show are right: the drawn detections checked against the ground truth.

Called by `rock_dist.quickstart` for its closing summary, on the COCO files its evaluation wrote
(`detections.json`, `ground_truth.json`; docs/evaluation.md). `rock_dist.detect` draws the detections scoring at
least the weights' `conf_threshold` after per-class NMS; greedy NMS only lets a higher score suppress a box, so the
evaluation's detections at or above that score (decoded with the same NMS from a lower threshold) are the boxes the
pictures show. Each drawn box is counted as on an object (IoU >= 0.3 with a ground-truth box of any class), as placed
(IoU >= 0.5 with one of any class) and as right (IoU >= 0.5 with one of its own class): AP says how well the scores
rank, this says what a user sees. Right boxes are placed ones, so right / placed is how often a well-placed box
names its object's class, which tells a wrong label apart from a loose box (docs/quickstart_experiments.md).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from rock_dist.model.boxes import box_iou

ON_OBJECT_IOU = 0.3
RIGHT_CLASS_IOU = 0.5  # COCO's AP@.5 criterion, per box


@dataclass(frozen=True)
class DrawnBoxCheck:
    """Counts over the drawn boxes (score >= `threshold`) of `images` images."""

    threshold: float
    images: int
    drawn: int
    on_object: int
    right_class: int
    placed: int  # boxes at IoU >= RIGHT_CLASS_IOU with an object of any class (right_class counts a subset)

    def class_accuracy_of_placed(self) -> float:
        """Fraction of the placed boxes (IoU >= RIGHT_CLASS_IOU with some object) that name its class."""
        return self.right_class / self.placed if self.placed else 0.0

    def describe(self) -> str:
        if self.drawn == 0:
            return f"pictures: no box scores {self.threshold:g} or more on the {self.images} test images"
        return (f"pictures: {self.drawn} boxes drawn at score >= {self.threshold:g} on {self.images} test images; "
                f"{100 * self.on_object / self.drawn:.0f} % lie on an object (IoU >= {ON_OBJECT_IOU:g}), "
                f"{100 * self.right_class / self.drawn:.0f} % name its class (IoU >= {RIGHT_CLASS_IOU:g}); of the "
                f"{self.placed} placed on an object (IoU >= {RIGHT_CLASS_IOU:g}), "
                f"{100 * self.class_accuracy_of_placed():.0f} % name its class")


def _xyxy(coco_boxes: Sequence[Sequence[float]]) -> torch.Tensor:
    boxes = torch.tensor(coco_boxes, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def check_drawn_boxes(detections: Sequence[Mapping[str, Any]], ground_truth: Mapping[str, Any],
                      threshold: float) -> DrawnBoxCheck:
    """Count the COCO `detections` scoring >= `threshold` that lie on a ground-truth object / on one of their own
    class (`ground_truth`: a COCO dict with `images` and `annotations`)."""
    truth: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for annotation in ground_truth["annotations"]:
        truth[int(annotation["image_id"])].append(annotation)
    drawn: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for detection in detections:
        if float(detection["score"]) >= threshold:
            drawn[int(detection["image_id"])].append(detection)
    on_object = right_class = placed = 0
    for image_id, boxes in drawn.items():
        objects = truth.get(image_id, [])
        if not objects:
            continue
        iou = box_iou(_xyxy([d["bbox"] for d in boxes]), _xyxy([a["bbox"] for a in objects]))
        same = (torch.tensor([d["category_id"] for d in boxes])[:, None]
                == torch.tensor([a["category_id"] for a in objects])[None, :])
        close = iou >= RIGHT_CLASS_IOU
        on_object += int((iou >= ON_OBJECT_IOU).any(dim=1).sum())
        placed += int(close.any(dim=1).sum())
        right_class += int((close & same).any(dim=1).sum())
    return DrawnBoxCheck(threshold=threshold, images=len(ground_truth["images"]),
                         drawn=sum(len(b) for b in drawn.values()), on_object=on_object, right_class=right_class,
                         placed=placed)


def check_evaluation_dir(eval_dir: str | Path, threshold: float) -> DrawnBoxCheck:
    """`check_drawn_boxes` on the COCO files `rock_dist.evaluate --coco_json_save_path eval_dir` wrote."""
    eval_dir = Path(eval_dir)
    detections = json.loads((eval_dir / "detections.json").read_text())
    ground_truth = json.loads((eval_dir / "ground_truth.json").read_text())
    return check_drawn_boxes(detections, ground_truth, threshold)


__all__ = ["DrawnBoxCheck", "check_drawn_boxes", "check_evaluation_dir", "ON_OBJECT_IOU", "RIGHT_CLASS_IOU"]
