"""Fixed vocabularies of the NYUv2 detection task: the 19 detection classes and the 27 scene types.

Used by the official reader, the synthetic writers, the shard manifest, the model builders (number of labels) and
evaluation (category names). Ids never depend on which classes or scenes a particular file happens to contain.
"""

from __future__ import annotations

# Detection classes in alphabetical order; label id = position + 1 (0 is background). docs/data_format.md.
CLASS_NAMES: tuple[str, ...] = (
    "bathtub",
    "bed",
    "bookshelf",
    "box",
    "chair",
    "counter",
    "desk",
    "door",
    "dresser",
    "garbage bin",
    "lamp",
    "monitor",
    "night stand",
    "pillow",
    "sink",
    "sofa",
    "table",
    "television",
    "toilet",
)

# The NYU label id of each class in the official `names` list (1-based). The reader looks ids up by name and
# checks them against this table, so a file whose vocabulary differs is reported instead of silently mislabelled.
NYU_LABEL_IDS: dict[str, int] = {
    "bathtub": 136,
    "bed": 157,
    "bookshelf": 88,
    "box": 26,
    "chair": 5,
    "counter": 7,
    "desk": 36,
    "door": 28,
    "dresser": 169,
    "garbage bin": 12,
    "lamp": 144,
    "monitor": 49,
    "night stand": 158,
    "pillow": 119,
    "sink": 24,
    "sofa": 83,
    "table": 19,
    "television": 172,
    "toilet": 124,
}

NUM_CLASSES_WITH_BACKGROUND = len(CLASS_NAMES) + 1  # 20 labels, as the SSD head predicts

# The 27 NYUv2 scene types in sorted order (note the dataset's own spelling "excercise_room"). docs/data_format.md.
SCENE_TYPES: tuple[str, ...] = (
    "basement",
    "bathroom",
    "bedroom",
    "bookstore",
    "cafe",
    "classroom",
    "computer_lab",
    "conference_room",
    "dinette",
    "dining_room",
    "excercise_room",
    "foyer",
    "furniture_store",
    "home_office",
    "home_storage",
    "indoor_balcony",
    "kitchen",
    "laundry_room",
    "living_room",
    "office",
    "office_kitchen",
    "playroom",
    "printer_room",
    "reception_room",
    "student_lounge",
    "study",
    "study_room",
)

NUM_SCENES = len(SCENE_TYPES)

# Number of entries in the official `names` list of nyu_depth_v2_labeled.mat.
NYU_NUM_NAMES = 894

assert len(CLASS_NAMES) == 19 and NUM_SCENES == 27
assert list(SCENE_TYPES) == sorted(SCENE_TYPES)


def class_id(name: str) -> int:
    """Detection label id (1..19) of a class name."""
    return CLASS_NAMES.index(name) + 1


def scene_id(scene_type: str) -> int:
    """Scene id (0..26) of a scene type; raises ValueError naming the unknown type."""
    try:
        return SCENE_TYPES.index(scene_type)
    except ValueError:
        raise ValueError(f"unknown scene type {scene_type!r}; expected one of the 27 NYUv2 scene types") from None
