"""The quickstart's picture check: drawn boxes counted against COCO ground truth (engine.picture_check)."""

from __future__ import annotations

import json

import pytest

from rock_dist.engine.picture_check import check_drawn_boxes, check_evaluation_dir


def _truth() -> dict:
    images = [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100},
              {"id": 3, "width": 100, "height": 100}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 40, 40]},
                   {"id": 2, "image_id": 1, "category_id": 7, "bbox": [50, 50, 40, 40]},
                   {"id": 3, "image_id": 2, "category_id": 5, "bbox": [10, 10, 20, 20]}]
    return {"images": images, "annotations": annotations, "categories": []}


def _detection(image_id: int, category_id: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


DETECTIONS = [
    _detection(1, 5, [0, 0, 40, 40], 0.9),     # right: same box, same class
    _detection(1, 5, [50, 50, 40, 40], 0.8),   # on the class-7 object, wrong class
    _detection(1, 7, [50, 50, 30, 40], 0.7),   # right: IoU 0.75 with its own class
    _detection(1, 7, [0, 0, 40, 15], 0.6),     # IoU 0.375 with the class-5 box: on an object, wrong class
    _detection(2, 5, [60, 60, 30, 30], 0.5),   # background
    _detection(3, 5, [0, 0, 50, 50], 0.95),    # image without objects: background
    _detection(1, 5, [0, 0, 40, 40], 0.3),     # below the drawing threshold: not drawn
]


def test_drawn_boxes_are_counted_on_objects_and_with_their_class() -> None:
    check = check_drawn_boxes(DETECTIONS, _truth(), 0.4)
    assert (check.images, check.drawn, check.on_object, check.right_class) == (3, 6, 4, 2)
    # Placed (IoU >= 0.5 with any object): the three boxes of image 1 that cover an object; the one on the
    # class-7 object names class 5, so 2 of the 3 name their object's class.
    assert check.placed == 3 and check.class_accuracy_of_placed() == pytest.approx(2 / 3)
    assert "of the 3 placed on an object (IoU >= 0.5), 67 % name its class" in check.describe()
    assert "6 boxes drawn at score >= 0.4 on 3 test images; 67 % lie on an object" in check.describe()
    assert "33 % name its class" in check.describe()
    strict = check_drawn_boxes(DETECTIONS, _truth(), 0.75)  # only the two best boxes of image 1 and image 3's
    assert (strict.drawn, strict.on_object, strict.right_class, strict.placed) == (3, 2, 1, 2)
    nothing = check_drawn_boxes(DETECTIONS, _truth(), 0.99)
    assert nothing.drawn == 0 and "no box scores 0.99" in nothing.describe()


def test_the_check_reads_the_evaluation_files(tmp_path) -> None:
    (tmp_path / "detections.json").write_text(json.dumps(DETECTIONS))
    (tmp_path / "ground_truth.json").write_text(json.dumps(_truth()))
    assert check_evaluation_dir(tmp_path, 0.4) == check_drawn_boxes(DETECTIONS, _truth(), 0.4)
    with pytest.raises(FileNotFoundError):
        check_evaluation_dir(tmp_path / "missing", 0.4)
