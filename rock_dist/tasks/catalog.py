"""The torch-free catalog of the auxiliary tasks' static facts: names, shard members, manifest modalities.

The command line (rock_dist.config: `AUX_TASKS` and the `--aux_tasks` choices), the shard format's shared contract
(rock_dist.data.manifest modalities, the member layouts of rock_dist.data.npy_member and rock_dist.data.members),
the shard checks (rock_dist.shardbuild.shard_writer.check_sample) and the modality counts of `rock_dist.shards` read
this catalog; none of them may import torch (`--help` and the shard builder stay light). Each entry also names the
module holding the task's torch part (its `AuxTask`), which rock_dist.tasks.registry imports, so one entry here is
the task's registration (docs/architecture.md, "Auxiliary tasks"). `register` adds an entry at run time (tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from rock_dist.data.constants import SCENE_TYPES
from rock_dist.tasks.listing import Listing

# The two stored encodings of a dense member (the shard builder's --aux_format; docs/data_format.md).
MAP_ENCODINGS: tuple[str, ...] = ("png", "npy")


@dataclass(frozen=True)
class MapMember:
    """A dense C x H x W shard member stored as `<stem>.png` or `<stem>.npy`: its element type name (the same in
    numpy and torch), its channel count, and the PIL modes the shard check accepts for its PNG."""

    stem: str
    dtype: str
    channels: int
    png_modes: tuple[str, ...]

    @property
    def exts(self) -> tuple[str, ...]:
        """The member's possible names in a sample (one of them at most is stored)."""
        return tuple(f"{self.stem}.{encoding}" for encoding in MAP_ENCODINGS)


# Checks one per-image label member's ASCII text against the sample's json: (the sample counts as having the
# label, problems as one-line strings without the member name).
LabelCheck = Callable[[str, Mapping[str, Any]], tuple[bool, list[str]]]


@dataclass(frozen=True)
class TaskSpec:
    """The static facts of one auxiliary task. `name` is the task's name everywhere (rock_dist.tasks.base.AuxTask
    .name, `--aux_tasks`, the manifest's modality count). Its shard members are either `maps` (dense members stored
    together: a sample has all or none; the first one marks the modality) or one `label` member (an ASCII value
    checked by `check_label`). `task` is "module:ATTRIBUTE" of its `AuxTask`."""

    name: str
    task: str
    maps: tuple[MapMember, ...] = ()
    label: str | None = None
    check_label: LabelCheck | None = None

    @property
    def member_exts(self) -> tuple[str, ...]:
        """Every member name the task may store in a sample."""
        return tuple(ext for member in self.maps for ext in member.exts) + ((self.label,) if self.label else ())

    @property
    def marker_exts(self) -> tuple[str, ...]:
        """The member names whose presence says the sample has the task's target (for counting modalities)."""
        return self.maps[0].exts if self.maps else ((self.label,) if self.label else ())


def _check_scene(text: str, meta: Mapping[str, Any]) -> tuple[bool, list[str]]:
    if not text.isdigit() or not 0 <= int(text) < len(SCENE_TYPES):
        return False, [f"{text!r} is not a scene id 0..{len(SCENE_TYPES) - 1}"]
    scene_type = meta.get("scene_type")
    if scene_type is not None and scene_type != SCENE_TYPES[int(text)]:
        return True, [f"id {text} is {SCENE_TYPES[int(text)]!r} but json says {scene_type!r}"]
    return True, []


# The built-in tasks, in the order they are built, trained, logged and reported in (docs/data_format.md for the
# members).
_BUILTIN: tuple[TaskSpec, ...] = (
    TaskSpec("scene", "rock_dist.tasks.scene:SCENE", label="scene.cls", check_label=_check_scene),
    TaskSpec("depth", "rock_dist.tasks.depth:DEPTH", maps=(MapMember("depth", "uint16", 1, ("I;16", "I;16B", "I")),)),
    TaskSpec("normals", "rock_dist.tasks.normals:NORMALS",
             maps=(MapMember("normals", "uint8", 3, ("RGB",)), MapMember("mask", "uint8", 1, ("L",)))),
)
_SPECS: Listing[TaskSpec] = Listing("auxiliary task", _BUILTIN)
specs = _SPECS.entries  # every entry, the ones added by `register` last
register = _SPECS.register
unregister = _SPECS.unregister


def builtin() -> tuple[TaskSpec, ...]:
    """The built-in entries (what the command line offers and the registry imports)."""
    return _BUILTIN


def builtin_names() -> tuple[str, ...]:
    """Names of the built-in tasks, in catalog order."""
    return tuple(spec.name for spec in _BUILTIN)


def in_shard_order() -> tuple[TaskSpec, ...]:
    """Every entry in the order of a sample's members (docs/data_format.md): the tasks with dense members, then
    the per-image labels, each group in catalog order."""
    return tuple(sorted(specs(), key=lambda spec: not spec.maps))  # sorted is stable


def modalities() -> tuple[str, ...]:
    """The manifest's modality counts (docs/data_format.md): the image, then the tasks in shard order."""
    return ("rgb",) + tuple(spec.name for spec in in_shard_order())


def map_member(stem: str) -> MapMember:
    """The dense member called `stem` (KeyError when no task stores one)."""
    for spec in specs():
        for member in spec.maps:
            if member.stem == stem:
                return member
    raise KeyError(f"no auxiliary task stores a member {stem!r}")


__all__ = ["MAP_ENCODINGS", "MapMember", "LabelCheck", "TaskSpec", "builtin", "builtin_names", "specs",
           "in_shard_order", "modalities", "map_member", "register", "unregister"]
