"""Room layouts for the synthetic NYUv2-like data set: furniture catalogue, scene recipes and camera poses.

A scene type (bedroom, bathroom, kitchen, living_room, office, dining_room, classroom) decides the room's size, its
wall/floor finish and which of the 19 detection classes appear, arranged the way people furnish rooms: beds and
dressers against walls, pillows on beds and sofas, lamps on night stands, monitors on desks, chairs around tables,
televisions on walls or on stands, doors in walls. Every object is a few oriented boxes (a chair is a seat, a back
and four legs) with a class-specific size range and material, so appearance carries the class. Distractors that
are not detection classes (cabinets, windows, pictures, whiteboards) keep the detector honest.

Used by `rock_dist.synthetic.rooms`, which renders a `Room` from `sample_camera` poses. Pure NumPy, seeded by the
caller's `numpy.random.Generator`.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from rock_dist.data.constants import CLASS_NAMES, NYU_LABEL_IDS
from rock_dist.synthetic.geometry import Box, Camera, Intrinsics, camera_rotation, rot_z

# NYU label ids of the room shell and of the distractors (positions in the official `names` list, 1-based).
NYU_WALL, NYU_FLOOR, NYU_CEILING = 21, 11, 4
DISTRACTOR_IDS: dict[str, int] = {"cabinet": 3, "whiteboard": 45, "window": 59, "picture": 64}

# The scene types rendered, and for each the detection classes its recipe can place (checked at build time).
SCENE_CLASSES: dict[str, frozenset[str]] = {
    "bedroom": frozenset({"bed", "pillow", "night stand", "lamp", "dresser", "television", "door", "box",
                          "garbage bin", "chair", "bookshelf"}),
    "bathroom": frozenset({"bathtub", "toilet", "sink", "counter", "garbage bin", "door", "box"}),
    "kitchen": frozenset({"counter", "sink", "table", "chair", "garbage bin", "door", "box"}),
    "living_room": frozenset({"sofa", "pillow", "table", "television", "lamp", "bookshelf", "chair", "door", "box"}),
    "office": frozenset({"desk", "monitor", "chair", "bookshelf", "garbage bin", "box", "door", "lamp", "table"}),
    "dining_room": frozenset({"table", "chair", "lamp", "dresser", "bookshelf", "door", "counter"}),
    "classroom": frozenset({"desk", "chair", "table", "television", "monitor", "bookshelf", "garbage bin", "door",
                            "box"}),
}
ROOM_SCENE_TYPES: tuple[str, ...] = tuple(SCENE_CLASSES)


@dataclass(frozen=True)
class Material:
    """Surface appearance of a part. `texture` names a pattern of `rock_dist.synthetic.rooms` for the sides; `front`
    and `top` override it on the +y and +z faces. `accent` is the pattern's second colour. `specular` and
    `dark_ir` surfaces drop Kinect depth (glossy ceramics, screens); `emissive` ones are not shaded (lamp shades,
    windows)."""

    color: tuple[float, float, float]
    texture: str = "plain"
    front: str | None = None
    top: str | None = None
    accent: tuple[float, float, float] = (0.1, 0.1, 0.1)
    specular: bool = False
    dark_ir: bool = False
    emissive: bool = False

    def texture_of_face(self, face: int) -> str:
        """Pattern on face id `face` (geometry.FACE_*): +y front, +z top, other faces the side pattern."""
        if face == 2 and self.front is not None:
            return self.front
        if face == 4 and self.top is not None:
            return self.top
        return self.texture


@dataclass
class Part:
    """A box of an object in the object's frame: `center` (x, y, z) and full `size`, z up from the floor."""

    center: tuple[float, float, float]
    size: tuple[float, float, float]
    material: Material


@dataclass
class SceneObject:
    """A placed object: a detection class (or a distractor / structure name), its NYU label id and its parts.

    The object frame has its origin at the centre of the footprint, on the object's base; +y is its front (the
    side facing into the room when it stands against a wall). `support` is (top height, half x, half y, centre y)
    of the surface that other objects can stand on, in the object frame.
    """

    name: str
    nyu_id: int
    parts: list[Part]
    position: np.ndarray = field(default_factory=lambda: np.zeros(3))
    yaw: float = 0.0
    support: tuple[float, float, float, float] | None = None
    is_class: bool = True

    @property
    def half_extent(self) -> tuple[float, float]:
        """Half sizes (x, y) of the footprint in the object frame."""
        xs = [abs(p.center[0]) + p.size[0] / 2 for p in self.parts]
        ys = [abs(p.center[1]) + p.size[1] / 2 for p in self.parts]
        return max(xs), max(ys)

    @property
    def height(self) -> float:
        return max(p.center[2] + p.size[2] / 2 for p in self.parts)

    def world_boxes(self) -> list[Box]:
        rot = rot_z(self.yaw)
        return [Box(center=self.position + rot @ np.asarray(p.center, dtype=np.float64),
                    half=np.asarray(p.size, dtype=np.float64) / 2, yaw=self.yaw) for p in self.parts]

    def aabb(self) -> np.ndarray:
        """World axis-aligned bounds [[x0, y0, z0], [x1, y1, z1]] of all parts."""
        corners = np.concatenate([b.corners() for b in self.world_boxes()])
        return np.stack([corners.min(axis=0), corners.max(axis=0)])

    def to_world(self, local: tuple[float, float, float]) -> np.ndarray:
        return self.position + rot_z(self.yaw) @ np.asarray(local, dtype=np.float64)


@dataclass
class Room:
    """A furnished room: size (Lx, Ly, Lz) metres, shell materials, objects, light, and a camera keep-in zone."""

    scene_type: str
    size: np.ndarray
    wall: Material
    floor: Material
    ceiling: Material
    objects: list[SceneObject]
    light: np.ndarray
    ambient: float
    camera_zone: np.ndarray  # [[x0, y0], [x1, y1]] kept free of furniture so a camera always fits

    def boxes(self) -> tuple[list[Box], list[int]]:
        """All parts as world boxes, and for each the index of its object."""
        boxes: list[Box] = []
        owner: list[int] = []
        for i, obj in enumerate(self.objects):
            for box in obj.world_boxes():
                boxes.append(box)
                owner.append(i)
        return boxes, owner


# ------------------------------------------------------------------------------------------------------ palettes
def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _rgb(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """Three numbers as an RGB tuple of floats."""
    r, g, b = values
    return float(r), float(g), float(b)


def _jit(rng: np.random.Generator, base: tuple[float, float, float], amount: float = 0.06
         ) -> tuple[float, float, float]:
    """A colour near `base`: per-instance variation without leaving the class's colour family."""
    return _rgb(np.clip(np.asarray(base) * (1 + rng.uniform(-amount, amount)) + rng.uniform(-amount, amount, 3) / 2,
                        0, 1))


def _pick(rng: np.random.Generator, options: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    return options[int(rng.integers(len(options)))]


WOODS = [(0.55, 0.36, 0.2), (0.68, 0.5, 0.32), (0.4, 0.25, 0.14), (0.78, 0.63, 0.45)]
PASTELS = [(0.75, 0.82, 0.92), (0.93, 0.8, 0.82), (0.9, 0.88, 0.8), (0.95, 0.95, 0.95), (0.8, 0.76, 0.9)]
FABRICS = [(0.35, 0.36, 0.4), (0.18, 0.22, 0.38), (0.42, 0.27, 0.18), (0.3, 0.42, 0.3), (0.55, 0.18, 0.17)]
PLASTICS = [(0.25, 0.25, 0.27), (0.55, 0.56, 0.58), (0.2, 0.35, 0.6), (0.25, 0.5, 0.3)]
CHAIRS = [(0.1, 0.1, 0.11), (0.5, 0.12, 0.1), (0.5, 0.33, 0.18), (0.3, 0.36, 0.45)]
WHITE_CERAMIC = (0.93, 0.93, 0.91)


def _signature_colours() -> dict[str, tuple[float, float, float]]:
    """One colour per detection class: hues spread round the colour wheel by the golden angle (neighbouring
    classes in the list land far apart), alternating bright and deep so no two classes are close."""
    colours: dict[str, tuple[float, float, float]] = {}
    for k, name in enumerate(CLASS_NAMES):
        hue = (k * 0.618034) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.9 if k % 2 == 0 else 0.55)
        colours[name] = (r, g, b)
    return colours


CLASS_SIGNATURES: dict[str, tuple[float, float, float]] = _signature_colours()


def tint_objects(objects: list[SceneObject], strength: float) -> None:
    """Blend every surface of each detection-class object toward its class's signature colour, in place.

    `strength` 0 keeps the natural (mostly wooden, often shared) colours; 1 paints each class in its own colour.
    Texture patterns stay, so shape and pattern still carry the class too. The quickstart uses the full tint: a
    detector trained from scratch for a few CPU minutes cannot yet tell a wooden desk from a wooden table by shape.
    """
    if strength <= 0:
        return
    for obj in objects:
        signature = CLASS_SIGNATURES.get(obj.name) if obj.is_class else None
        if signature is None:
            continue
        for part in obj.parts:
            colour = _rgb([(1 - strength) * c + strength * t for c, t in zip(part.material.color, signature)])
            part.material = dataclasses.replace(part.material, color=colour)


# ---------------------------------------------------------------------------------------------------- catalogue
def _p(x: float, y: float, z0: float, sx: float, sy: float, sz: float, mat: Material) -> Part:
    """A part by its footprint centre (x, y), bottom height z0 and full size."""
    return Part((x, y, z0 + sz / 2), (sx, sy, sz), mat)


def make_object(name: str, rng: np.random.Generator, *, variant: str = "") -> SceneObject:
    """A new object of class (or distractor) `name` with random size and material, at the origin."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"no builder for object {name!r}")
    obj = builder(rng, variant)
    return obj


def _one_block(name: str, w: float, d: float, h: float, mat: Material, *, on_top: bool = False) -> SceneObject:
    """An object of one box, w x d x h on the floor; `on_top`: small things may stand on its top."""
    return SceneObject(name, NYU_LABEL_IDS[name], [_p(0, 0, 0, w, d, h, mat)],
                       support=(h, w / 2, d / 2, 0.0) if on_top else None)


def _bathtub(rng: np.random.Generator, variant: str) -> SceneObject:
    w, d, h = _u(rng, 1.45, 1.75), _u(rng, 0.7, 0.8), _u(rng, 0.5, 0.6)
    mat = Material(_jit(rng, WHITE_CERAMIC, 0.03), "plain", top="basin", accent=(0.78, 0.82, 0.86), specular=True)
    return _one_block("bathtub", w, d, h, mat)


def _bed(rng: np.random.Generator, variant: str) -> SceneObject:
    w, length, h = _u(rng, 1.0, 1.9), _u(rng, 1.9, 2.1), _u(rng, 0.48, 0.62)
    wood = Material(_jit(rng, _pick(rng, WOODS)), "wood")
    sheet = Material(_jit(rng, _pick(rng, PASTELS), 0.04), "fabric", top="sheet",
                     accent=_jit(rng, _pick(rng, FABRICS)))
    base_h = 0.22
    hb_h = _u(rng, 0.9, 1.2)
    parts = [_p(0, 0.03, 0, w, length, base_h, wood),
             _p(0, 0.03, base_h, w - 0.04, length - 0.04, h - base_h, sheet),
             _p(0, -length / 2, 0, w + 0.04, 0.06, hb_h, wood)]
    return SceneObject("bed", NYU_LABEL_IDS["bed"], parts, support=(h, w / 2 - 0.05, length / 2 - 0.05, 0.0))


def _bookshelf(rng: np.random.Generator, variant: str) -> SceneObject:
    w, d, h = _u(rng, 0.6, 1.2), _u(rng, 0.28, 0.4), _u(rng, 1.1, 2.0)
    mat = Material(_jit(rng, _pick(rng, WOODS)), "wood", front="shelves", accent=(0.6, 0.2, 0.2))
    return _one_block("bookshelf", w, d, h, mat, on_top=True)


def _box(rng: np.random.Generator, variant: str) -> SceneObject:
    s = _u(rng, 0.25, 0.55)
    w, d, h = s * _u(rng, 0.9, 1.3), s * _u(rng, 0.8, 1.1), s * _u(rng, 0.6, 1.0)
    mat = Material(_jit(rng, (0.72, 0.55, 0.34), 0.08), "cardboard", top="tape", accent=(0.85, 0.75, 0.55))
    return _one_block("box", w, d, h, mat, on_top=True)


def _chair(rng: np.random.Generator, variant: str) -> SceneObject:
    s, sh = _u(rng, 0.42, 0.5), _u(rng, 0.43, 0.48)
    frame = Material(_jit(rng, _pick(rng, CHAIRS)), "plain")
    seat = Material(_jit(rng, frame.color, 0.1), "fabric", accent=_jit(rng, frame.color, 0.2))
    leg, t = 0.04, 0.05
    lh = sh - t
    off = s / 2 - leg / 2
    parts = [_p(0, 0, lh, s, s, t, seat), _p(0, -s / 2 + 0.025, sh, s, 0.05, _u(rng, 0.35, 0.5), seat)]
    parts += [_p(sx * off, sy * off, 0, leg, leg, lh, frame) for sx in (-1, 1) for sy in (-1, 1)]
    return SceneObject("chair", NYU_LABEL_IDS["chair"], parts)


def _counter(rng: np.random.Generator, variant: str) -> SceneObject:
    w, d, h = _u(rng, 1.2, 2.6), _u(rng, 0.58, 0.65), _u(rng, 0.86, 0.92)
    body = Material(_jit(rng, _pick(rng, [(0.92, 0.92, 0.9), *WOODS[:2]])), "plain", front="cabinet",
                    accent=(0.3, 0.3, 0.3))
    top = Material(_jit(rng, _pick(rng, [(0.2, 0.2, 0.22), (0.85, 0.84, 0.8), (0.45, 0.42, 0.4)])), "speckle")
    parts = [_p(0, -0.01, 0, w, d - 0.02, h - 0.04, body), _p(0, 0, h - 0.04, w + 0.02, d + 0.02, 0.04, top)]
    return SceneObject("counter", NYU_LABEL_IDS["counter"], parts, support=(h, w / 2, d / 2, 0.0))


def _desk(rng: np.random.Generator, variant: str) -> SceneObject:
    w, d, h = _u(rng, 1.0, 1.6), _u(rng, 0.6, 0.8), _u(rng, 0.72, 0.76)
    col = _pick(rng, [(0.8, 0.8, 0.78), (0.62, 0.62, 0.6), *WOODS[1::2]])
    top = Material(_jit(rng, col), "wood" if col in WOODS else "plain")
    side = Material(_jit(rng, col, 0.04), "plain", front="drawers", accent=(0.2, 0.2, 0.2))
    t = 0.03
    ped = _u(rng, 0.35, 0.45)
    parts = [_p(0, 0, h - t, w, d, t, top),
             _p(-w / 2 + ped / 2, 0, 0, ped, d - 0.02, h - t, side),
             _p(w / 2 - 0.015, 0, 0, 0.03, d - 0.02, h - t, side)]
    return SceneObject("desk", NYU_LABEL_IDS["desk"], parts, support=(h, w / 2, d / 2, 0.0))


def _door(rng: np.random.Generator, variant: str) -> SceneObject:
    w, h = _u(rng, 0.8, 0.95), _u(rng, 2.0, 2.1)
    mat = Material(_jit(rng, _pick(rng, [(0.95, 0.95, 0.93), *WOODS])), "plain", front="door",
                   accent=(0.75, 0.7, 0.55))
    return SceneObject("door", NYU_LABEL_IDS["door"], [_p(0, 0, 0, w, 0.05, h, mat)])


def _dresser(rng: np.random.Generator, variant: str) -> SceneObject:
    w, d, h = _u(rng, 0.8, 1.6), _u(rng, 0.42, 0.55), _u(rng, 0.75, 1.1)
    mat = Material(_jit(rng, _pick(rng, WOODS)), "wood", front="drawers", accent=(0.15, 0.12, 0.1))
    return _one_block("dresser", w, d, h, mat, on_top=True)


def _garbage_bin(rng: np.random.Generator, variant: str) -> SceneObject:
    w, d, h = _u(rng, 0.25, 0.4), _u(rng, 0.25, 0.4), _u(rng, 0.35, 0.7)
    mat = Material(_jit(rng, _pick(rng, PLASTICS)), "ribbed", top="bin_top", accent=(0.05, 0.05, 0.05))
    return _one_block("garbage bin", w, d, h, mat)


def _lamp(rng: np.random.Generator, variant: str) -> SceneObject:
    floor = variant == "floor"
    metal = Material(_jit(rng, _pick(rng, [(0.15, 0.15, 0.15), (0.7, 0.6, 0.35), (0.75, 0.75, 0.78)])), "plain")
    shade = Material(_jit(rng, _pick(rng, [(1.0, 0.93, 0.78), (0.98, 0.98, 0.92), (1.0, 0.85, 0.6)]), 0.03),
                     "plain", emissive=True)
    pole_h = _u(rng, 1.15, 1.45) if floor else _u(rng, 0.2, 0.35)
    sw, sh = (_u(rng, 0.35, 0.45), _u(rng, 0.25, 0.35)) if floor else (_u(rng, 0.22, 0.32), _u(rng, 0.16, 0.24))
    base = 0.3 if floor else 0.14
    parts = [_p(0, 0, 0, base, base, 0.03, metal), _p(0, 0, 0.03, 0.03, 0.03, pole_h, metal),
             _p(0, 0, 0.03 + pole_h - sh * 0.3, sw, sw, sh, shade)]
    return SceneObject("lamp", NYU_LABEL_IDS["lamp"], parts)


def _screen(rng: np.random.Generator, name: str, w: float, h: float, t: float, stand: bool) -> SceneObject:
    mat = Material(_jit(rng, (0.08, 0.08, 0.09), 0.3), "plain", front="screen",
                   accent=_jit(rng, (0.1, 0.16, 0.3), 0.5), specular=True, dark_ir=True)
    parts: list[Part] = []
    z0 = 0.0
    if stand:
        neck = _u(rng, 0.06, 0.14)
        parts = [_p(0, 0, 0, min(0.35, w * 0.45), 0.18, 0.02, mat), _p(0, -0.02, 0.02, 0.05, 0.03, neck + 0.05, mat)]
        z0 = 0.02 + neck
    parts.append(_p(0, 0.0, z0, w, t, h, mat))
    return SceneObject(name, NYU_LABEL_IDS[name], parts)


def _monitor(rng: np.random.Generator, variant: str) -> SceneObject:
    w = _u(rng, 0.42, 0.62)
    return _screen(rng, "monitor", w, w * _u(rng, 0.58, 0.7), 0.04, stand=True)


def _television(rng: np.random.Generator, variant: str) -> SceneObject:
    w = _u(rng, 0.8, 1.35)
    return _screen(rng, "television", w, w * 0.58, 0.07, stand=variant != "wall")


def _night_stand(rng: np.random.Generator, variant: str) -> SceneObject:
    w, d, h = _u(rng, 0.4, 0.55), _u(rng, 0.35, 0.45), _u(rng, 0.5, 0.65)
    mat = Material(_jit(rng, _pick(rng, WOODS[1:])), "wood", front="drawers", accent=(0.12, 0.1, 0.08))
    return _one_block("night stand", w, d, h, mat, on_top=True)


def _pillow(rng: np.random.Generator, variant: str) -> SceneObject:
    w, d, h = _u(rng, 0.45, 0.7), _u(rng, 0.3, 0.42), _u(rng, 0.1, 0.17)
    mat = Material(_jit(rng, _pick(rng, PASTELS + [(0.85, 0.6, 0.3), (0.5, 0.65, 0.75)])), "pillow",
                   accent=_jit(rng, _pick(rng, FABRICS)))
    return _one_block("pillow", w, d, h, mat)


def _sink(rng: np.random.Generator, variant: str) -> SceneObject:
    if variant == "counter":  # a steel basin rim standing 2 cm proud of the worktop
        w, d = _u(rng, 0.5, 0.8), _u(rng, 0.38, 0.48)
        mat = Material(_jit(rng, (0.72, 0.73, 0.75), 0.04), "plain", top="basin", accent=(0.4, 0.42, 0.45),
                       specular=True)
        return SceneObject("sink", NYU_LABEL_IDS["sink"], [_p(0, 0, 0, w, d, 0.02, mat)])
    w, d = _u(rng, 0.48, 0.6), _u(rng, 0.4, 0.48)
    mat = Material(_jit(rng, WHITE_CERAMIC, 0.03), "plain", top="basin", accent=(0.75, 0.78, 0.8), specular=True)
    top = _u(rng, 0.8, 0.88)
    return SceneObject("sink", NYU_LABEL_IDS["sink"],
                       [_p(0, -0.05, 0, 0.16, 0.16, top - 0.18, mat), _p(0, 0, top - 0.18, w, d, 0.18, mat)])


def _sofa(rng: np.random.Generator, variant: str) -> SceneObject:
    w, d = _u(rng, 1.6, 2.4), _u(rng, 0.85, 1.0)
    mat = Material(_jit(rng, _pick(rng, FABRICS)), "fabric", accent=_jit(rng, _pick(rng, FABRICS)))
    arm, back = 0.18, 0.2
    sh, bh, ah = _u(rng, 0.4, 0.46), _u(rng, 0.78, 0.9), _u(rng, 0.55, 0.65)
    parts = [_p(0, back / 2, 0, w - 2 * arm, d - back, sh, mat), _p(0, -d / 2 + back / 2, 0, w, back, bh, mat),
             _p(-w / 2 + arm / 2, 0, 0, arm, d, ah, mat), _p(w / 2 - arm / 2, 0, 0, arm, d, ah, mat)]
    return SceneObject("sofa", NYU_LABEL_IDS["sofa"], parts,
                       support=(sh, w / 2 - arm - 0.02, (d - back) / 2 - 0.02, back / 2))


def _table(rng: np.random.Generator, variant: str) -> SceneObject:
    if variant == "coffee":
        w, d, h = _u(rng, 0.8, 1.2), _u(rng, 0.45, 0.7), _u(rng, 0.38, 0.48)
    else:
        w, d, h = _u(rng, 1.0, 1.8), _u(rng, 0.75, 1.0), _u(rng, 0.72, 0.76)
    wood = Material(_jit(rng, _pick(rng, WOODS)), "wood")
    t, leg = 0.04, _u(rng, 0.05, 0.07)
    parts = [_p(0, 0, h - t, w, d, t, wood)]
    parts += [_p(sx * (w / 2 - leg), sy * (d / 2 - leg), 0, leg, leg, h - t, wood) for sx in (-1, 1) for sy in (-1, 1)]
    return SceneObject("table", NYU_LABEL_IDS["table"], parts, support=(h, w / 2, d / 2, 0.0))


def _toilet(rng: np.random.Generator, variant: str) -> SceneObject:
    mat = Material(_jit(rng, WHITE_CERAMIC, 0.03), "plain", top="basin", accent=(0.8, 0.82, 0.84), specular=True)
    bw, bd, bh = _u(rng, 0.36, 0.42), _u(rng, 0.48, 0.56), _u(rng, 0.38, 0.43)
    tw, td, th = bw + 0.04, _u(rng, 0.17, 0.22), _u(rng, 0.35, 0.42)
    total = bd + td
    parts = [_p(0, total / 2 - bd / 2, 0, bw, bd, bh, mat), _p(0, -total / 2 + td / 2, 0, tw, td, bh + th, mat)]
    return SceneObject("toilet", NYU_LABEL_IDS["toilet"], parts)


def _cabinet(rng: np.random.Generator, variant: str) -> SceneObject:
    if variant == "tv_stand":  # low and wide, to carry a television
        w, d, h = _u(rng, 1.3, 1.8), _u(rng, 0.38, 0.48), _u(rng, 0.42, 0.6)
    else:
        w, d, h = _u(rng, 0.6, 1.6), _u(rng, 0.32, 0.45), _u(rng, 0.45, 0.75)
    mat = Material(_jit(rng, _pick(rng, [(0.85, 0.85, 0.83), *WOODS])), "plain", front="cabinet",
                   accent=(0.35, 0.35, 0.35))
    return SceneObject("cabinet", DISTRACTOR_IDS["cabinet"], [_p(0, 0, 0, w, d, h, mat)],
                       support=(h, w / 2, d / 2, 0.0), is_class=False)


def _flat(rng: np.random.Generator, name: str, w: float, h: float, mat: Material) -> SceneObject:
    return SceneObject(name, DISTRACTOR_IDS[name], [_p(0, 0, 0, w, 0.03, h, mat)], is_class=False)


def _window(rng: np.random.Generator, variant: str) -> SceneObject:
    mat = Material(_jit(rng, (0.78, 0.86, 0.97), 0.05), "plain", front="window", accent=(0.92, 0.92, 0.9),
                   emissive=True, specular=True)
    return _flat(rng, "window", _u(rng, 0.8, 1.6), _u(rng, 0.9, 1.3), mat)


def _picture(rng: np.random.Generator, variant: str) -> SceneObject:
    mat = Material(_rgb(rng.uniform(0.1, 0.9, 3)), "picture", accent=_rgb(rng.uniform(0.1, 0.9, 3)))
    return _flat(rng, "picture", _u(rng, 0.3, 0.9), _u(rng, 0.3, 0.7), mat)


def _whiteboard(rng: np.random.Generator, variant: str) -> SceneObject:
    mat = Material((0.95, 0.96, 0.96), "plain", front="whiteboard", accent=(0.6, 0.6, 0.62))
    return _flat(rng, "whiteboard", _u(rng, 1.8, 3.0), _u(rng, 1.0, 1.2), mat)


_BUILDERS: dict[str, Callable[[np.random.Generator, str], SceneObject]] = {
    "bathtub": _bathtub, "bed": _bed, "bookshelf": _bookshelf, "box": _box, "chair": _chair, "counter": _counter,
    "desk": _desk, "door": _door, "dresser": _dresser, "garbage bin": _garbage_bin, "lamp": _lamp,
    "monitor": _monitor, "night stand": _night_stand, "pillow": _pillow, "sink": _sink, "sofa": _sofa,
    "table": _table, "television": _television, "toilet": _toilet, "cabinet": _cabinet, "window": _window,
    "picture": _picture, "whiteboard": _whiteboard,
}


# ------------------------------------------------------------------------------------------------------- layout
class _Layout:
    """Places objects in a room without interpenetration (3D bounding boxes with a margin)."""

    def __init__(self, rng: np.random.Generator, size: np.ndarray) -> None:
        self.rng = rng
        self.size = size
        self.objects: list[SceneObject] = []
        # World AABBs that new objects must avoid, each with the object it belongs to (None: a bare keep-out zone).
        self.blocked: list[tuple[np.ndarray, SceneObject | None]] = []

    def _fits(self, aabb: np.ndarray, ignore: tuple[SceneObject, ...] = (), margin: float = 0.04) -> bool:
        if np.any(aabb[0, :2] < -1e-6) or np.any(aabb[1] > self.size + 1e-6):
            return False
        for other, owner in self.blocked:
            if owner is not None and any(owner is o for o in ignore):
                continue
            if np.all(aabb[0] < other[1] + margin) and np.all(other[0] < aabb[1] + margin):
                return False
        return True

    def _commit(self, obj: SceneObject, keep_out: np.ndarray | None = None) -> SceneObject:
        self.objects.append(obj)
        self.blocked.append((obj.aabb(), obj))
        if keep_out is not None:
            self.blocked.append((keep_out, obj))
        return obj

    def block(self, aabb: np.ndarray) -> None:
        self.blocked.append((aabb, None))

    def wall_pose(self, wall: int, along: float, off: float) -> tuple[np.ndarray, float]:
        """Position and yaw of an object whose back touches wall `wall` (0: y=0, 1: x=Lx, 2: y=Ly, 3: x=0)."""
        lx, ly = float(self.size[0]), float(self.size[1])
        if wall == 0:
            return np.array([along, off, 0.0]), 0.0
        if wall == 1:
            return np.array([lx - off, along, 0.0]), math.pi / 2
        if wall == 2:
            return np.array([lx - along, ly - off, 0.0]), math.pi
        return np.array([off, ly - along, 0.0]), -math.pi / 2

    def wall_length(self, wall: int) -> float:
        return float(self.size[0] if wall in (0, 2) else self.size[1])

    def against_wall(self, obj: SceneObject, *, z: float = 0.0, walls: tuple[int, ...] = (0, 1, 2, 3),
                     clearance: float = 0.0, tries: int = 30) -> SceneObject | None:
        """Put `obj` with its back to a wall at height `z`; `clearance` keeps that much floor free in front."""
        hx, hy = obj.half_extent
        for _ in range(tries):
            wall = int(walls[int(self.rng.integers(len(walls)))])
            length = self.wall_length(wall)
            if length < 2 * hx + 0.1:
                continue
            along = _u(self.rng, hx + 0.05, length - hx - 0.05)
            pos, yaw = self.wall_pose(wall, along, hy + 0.005)
            obj.position, obj.yaw = pos + np.array([0.0, 0.0, z]), yaw
            aabb = obj.aabb()
            keep_out = None
            if clearance > 0:
                # The floor in front stays free up to 2 m high (the swing of a door, the space to use a bed).
                free = _p(0, hy + clearance / 2, 0, 2 * hx, clearance, 2.0, obj.parts[0].material)
                keep_out = SceneObject("", 0, [free], position=pos.copy(), yaw=yaw).aabb()
                if not self._fits(keep_out):
                    continue
            if self._fits(aabb):
                return self._commit(obj, keep_out)
        return None

    def free(self, obj: SceneObject, *, aligned: bool = True, tries: int = 30) -> SceneObject | None:
        """Stand `obj` on the floor anywhere it fits; `aligned` keeps it roughly parallel to the walls."""
        hx, hy = obj.half_extent
        r = math.hypot(hx, hy)
        lo, hi = np.array([r, r]), self.size[:2] - r
        if np.any(hi <= lo):
            return None
        for _ in range(tries):
            xy = self.rng.uniform(lo, hi)
            yaw = float(self.rng.integers(4)) * math.pi / 2 + (self.rng.normal(0, 0.08) if aligned
                                                                else self.rng.uniform(-math.pi, math.pi))
            obj.position, obj.yaw = np.array([xy[0], xy[1], 0.0]), yaw
            if self._fits(obj.aabb()):
                return self._commit(obj)
        return None

    def at(self, obj: SceneObject, position: np.ndarray, yaw: float, ignore: tuple[SceneObject, ...] = ()
           ) -> SceneObject | None:
        """Put `obj` exactly there if it fits (`ignore`: objects it may touch, e.g. the one it stands on)."""
        obj.position, obj.yaw = np.asarray(position, dtype=np.float64), yaw
        if self._fits(obj.aabb(), ignore=ignore):
            return self._commit(obj)
        return None

    def on(self, obj: SceneObject, parent: SceneObject, *, y_range: tuple[float, float] = (-1.0, 1.0),
           x_range: tuple[float, float] = (-1.0, 1.0), yaw_jitter: float = 0.15, tries: int = 20
           ) -> SceneObject | None:
        """Stand `obj` on `parent`'s support surface; ranges are fractions of the free half sizes."""
        if parent.support is None:
            return None
        top, sx, sy, cy = parent.support
        hx, hy = obj.half_extent
        fx, fy = sx - hx, sy - hy
        if fx < 0 or fy < 0:
            return None
        for _ in range(tries):
            lx = _u(self.rng, x_range[0] * fx, x_range[1] * fx)
            ly = cy + _u(self.rng, y_range[0] * fy, y_range[1] * fy)
            placed = self.at(obj, parent.to_world((lx, ly, top)), parent.yaw + self.rng.normal(0, yaw_jitter),
                             ignore=(parent,))
            if placed is not None:
                return placed
        return None

    def beside(self, obj: SceneObject, parent: SceneObject, side: int, gap: float = 0.07) -> SceneObject | None:
        """Stand `obj` next to `parent` (side -1 left, +1 right), backs aligned (a night stand by a bed)."""
        phx, phy = parent.half_extent
        hx, hy = obj.half_extent
        local = (side * (phx + hx + gap), -phy + hy, 0.0)
        return self.at(obj, parent.to_world(local), parent.yaw)

    def facing(self, obj: SceneObject, target: SceneObject, local_xy: tuple[float, float]) -> SceneObject | None:
        """Stand `obj` at `local_xy` in `target`'s frame, its front (+y) turned towards `target` (chairs)."""
        pos = target.to_world((local_xy[0], local_xy[1], 0.0))
        # Face the side of the target the chair stands at (square to it), not the target's centre.
        axis = np.array([np.sign(local_xy[0]), 0.0, 0.0]) if abs(local_xy[0]) > abs(local_xy[1]) else \
            np.array([0.0, np.sign(local_xy[1]), 0.0])
        d = -(rot_z(target.yaw) @ axis)[:2]
        yaw = math.atan2(d[1], d[0]) - math.pi / 2 + self.rng.normal(0, 0.1)
        return self.at(obj, pos, yaw, ignore=(target,))


def _maybe(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def _count(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


def _new(name: str, rng: np.random.Generator, variant: str = "") -> SceneObject:
    return make_object(name, rng, variant=variant)


def _wall_decor(lay: _Layout, rng: np.random.Generator, scene_type: str) -> None:
    """Doors, windows and pictures on the walls, common to all scene types."""
    if _maybe(rng, 0.75):
        lay.against_wall(_new("door", rng), clearance=0.7)
    for _ in range(_count(rng, 0, 2)):
        lay.against_wall(_new("window", rng), z=_u(rng, 0.8, 1.1))
    for _ in range(_count(rng, 0, 2 if scene_type != "bathroom" else 1)):
        lay.against_wall(_new("picture", rng), z=_u(rng, 1.3, 1.6))


def _scatter(lay: _Layout, rng: np.random.Generator, name: str, lo: int, hi: int) -> None:
    for _ in range(_count(rng, lo, hi)):
        lay.free(_new(name, rng), aligned=False)


def _bedroom(lay: _Layout, rng: np.random.Generator) -> None:
    new_bed = _new("bed", rng)
    bed = lay.against_wall(new_bed, clearance=0.5) or lay.against_wall(new_bed, tries=60)  # a bedroom has a bed
    if bed is not None:
        for _ in range(_count(rng, 1, 3)):
            lay.on(_new("pillow", rng), bed, y_range=(-1.0, -0.75), yaw_jitter=0.1)
        for side in (-1, 1):
            if _maybe(rng, 0.65):
                stand = lay.beside(_new("night stand", rng), bed, side)
                if stand is not None and _maybe(rng, 0.7):
                    lay.on(_new("lamp", rng), stand, yaw_jitter=0.3)
    if _maybe(rng, 0.6):
        dresser = lay.against_wall(_new("dresser", rng), clearance=0.5)
        if dresser is not None and _maybe(rng, 0.4):
            lay.on(_new("television", rng, "stand"), dresser, y_range=(-1.0, 0.0), yaw_jitter=0.05)
    if _maybe(rng, 0.2):
        lay.against_wall(_new("television", rng, "wall"), z=_u(rng, 1.0, 1.3))
    if _maybe(rng, 0.25):
        lay.against_wall(_new("bookshelf", rng), clearance=0.4)
    if _maybe(rng, 0.3):
        lay.free(_new("chair", rng), aligned=False)
    if _maybe(rng, 0.2):
        lay.against_wall(_new("lamp", rng, "floor"))
    _scatter(lay, rng, "box", 0, 2)
    _scatter(lay, rng, "garbage bin", 0, 1)


def _bathroom(lay: _Layout, rng: np.random.Generator) -> None:
    if _maybe(rng, 0.8):
        lay.against_wall(_new("bathtub", rng), clearance=0.3)
    lay.against_wall(_new("toilet", rng), clearance=0.5)
    if _maybe(rng, 0.6):
        counter = lay.against_wall(_new("counter", rng), clearance=0.5)
        if counter is not None:
            lay.on(_new("sink", rng, "counter"), counter, y_range=(-0.3, 0.3), yaw_jitter=0.0)
    else:
        lay.against_wall(_new("sink", rng), clearance=0.5)
    if _maybe(rng, 0.3):
        lay.against_wall(_new("cabinet", rng), z=_u(rng, 1.4, 1.6))
    _scatter(lay, rng, "garbage bin", 0, 1)
    _scatter(lay, rng, "box", 0, 1)


def _kitchen(lay: _Layout, rng: np.random.Generator) -> None:
    counters = [c for c in (lay.against_wall(_new("counter", rng), clearance=0.7) for _ in range(_count(rng, 1, 3)))
                if c is not None]
    if counters:
        lay.on(_new("sink", rng, "counter"), counters[0], y_range=(-0.3, 0.3), yaw_jitter=0.0)
    for _ in range(_count(rng, 0, 2)):
        lay.against_wall(_new("cabinet", rng), z=_u(rng, 1.45, 1.6))
    if _maybe(rng, 0.6):
        _table_with_chairs(lay, rng, 0, 4)
    _scatter(lay, rng, "garbage bin", 0, 1)
    _scatter(lay, rng, "box", 0, 2)


def _table_with_chairs(lay: _Layout, rng: np.random.Generator, lo: int, hi: int) -> SceneObject | None:
    table = lay.free(_new("table", rng), aligned=True)
    if table is None:
        return None
    hx, hy = table.half_extent
    spots = [(x, s * (hy + 0.18)) for s in (-1, 1) for x in ((-hx / 2, hx / 2) if hx > 0.6 else (0.0,))]
    spots += [(s * (hx + 0.18), 0.0) for s in (-1, 1)]
    rng.shuffle(spots)
    for xy in spots[:_count(rng, lo, hi)]:
        lay.facing(_new("chair", rng), table, xy)
    return table


def _living_room(lay: _Layout, rng: np.random.Generator) -> None:
    sofa = lay.against_wall(_new("sofa", rng), clearance=0.3)
    if sofa is not None:
        for _ in range(_count(rng, 0, 3)):
            lay.on(_new("pillow", rng), sofa, y_range=(-1.0, -0.6), yaw_jitter=0.2)
        if _maybe(rng, 0.8):
            table = _new("table", rng, "coffee")
            _, shy = sofa.half_extent
            lay.at(table, sofa.to_world((0.0, shy + 0.45 + table.half_extent[1], 0.0)), sofa.yaw)
    if _maybe(rng, 0.8):
        if _maybe(rng, 0.5):
            lay.against_wall(_new("television", rng, "wall"), z=_u(rng, 0.9, 1.2))
        else:
            stand = lay.against_wall(_new("cabinet", rng, "tv_stand"), clearance=0.4)
            if stand is not None:
                lay.on(_new("television", rng, "stand"), stand, yaw_jitter=0.05)
    if _maybe(rng, 0.5):
        lay.against_wall(_new("lamp", rng, "floor"))
    if _maybe(rng, 0.5):
        lay.against_wall(_new("bookshelf", rng), clearance=0.4)
    _scatter(lay, rng, "chair", 0, 2)
    _scatter(lay, rng, "box", 0, 1)


def _office(lay: _Layout, rng: np.random.Generator) -> None:
    for _ in range(_count(rng, 1, 3)):
        desk = lay.against_wall(_new("desk", rng), clearance=0.8) if _maybe(rng, 0.7) else \
            lay.free(_new("desk", rng))
        if desk is None:
            continue
        for _ in range(_count(rng, 1, 2) if _maybe(rng, 0.9) else 0):
            lay.on(_new("monitor", rng), desk, y_range=(-1.0, -0.3), yaw_jitter=0.15)
        if _maybe(rng, 0.3):
            lay.on(_new("lamp", rng), desk, y_range=(-1.0, 0.0))
        if _maybe(rng, 0.85):
            _, hy = desk.half_extent
            lay.facing(_new("chair", rng), desk, (_u(rng, -0.2, 0.2), hy + 0.2))
    if _maybe(rng, 0.6):
        lay.against_wall(_new("bookshelf", rng), clearance=0.4)
    if _maybe(rng, 0.2):
        lay.free(_new("table", rng))
    _scatter(lay, rng, "garbage bin", 0, 1)
    _scatter(lay, rng, "box", 0, 3)


def _dining_room(lay: _Layout, rng: np.random.Generator) -> None:
    _table_with_chairs(lay, rng, 2, 6)
    if _maybe(rng, 0.4):
        dresser = lay.against_wall(_new("dresser", rng), clearance=0.4)
        if dresser is not None and _maybe(rng, 0.4):
            lay.on(_new("lamp", rng), dresser)
    if _maybe(rng, 0.3):
        lay.against_wall(_new("lamp", rng, "floor"))
    if _maybe(rng, 0.25):
        lay.against_wall(_new("bookshelf", rng), clearance=0.4)
    if _maybe(rng, 0.2):
        lay.against_wall(_new("counter", rng), clearance=0.6)


def _classroom(lay: _Layout, rng: np.random.Generator) -> None:
    lx, ly = float(lay.size[0]), float(lay.size[1])
    lay.against_wall(_new("whiteboard", rng), z=0.9, walls=(0,))
    if _maybe(rng, 0.7):
        table = _new("table", rng)
        lay.at(table, np.array([_u(rng, 1.5, lx - 1.5), 1.2, 0.0]), math.pi + rng.normal(0, 0.05))
    rows, cols = _count(rng, 2, 3), _count(rng, 2, 3)
    for r in range(rows):
        for c in range(cols):
            if _maybe(rng, 0.15):
                continue
            desk = _new("desk", rng)
            x = lx * (c + 1) / (cols + 1) + rng.normal(0, 0.08)
            y = 2.4 + r * min(1.6, (ly - 3.2) / max(rows, 1)) + rng.normal(0, 0.05)
            # Students face the board (wall 0), so a desk's front (+y, where the chair goes) faces away from it.
            placed = lay.at(desk, np.array([x, y, 0.0]), rng.normal(0, 0.05))
            if placed is not None and _maybe(rng, 0.85):
                _, hy = placed.half_extent
                lay.facing(_new("chair", rng), placed, (0.0, hy + 0.22))
    if _maybe(rng, 0.4):
        lay.against_wall(_new("television", rng, "wall"), z=_u(rng, 1.6, 1.8), walls=(1, 3))
    if _maybe(rng, 0.4):
        lay.against_wall(_new("bookshelf", rng), walls=(1, 2, 3))
    _scatter(lay, rng, "garbage bin", 0, 1)
    _scatter(lay, rng, "box", 0, 1)


_RECIPES: dict[str, Callable[[_Layout, np.random.Generator], None]] = {
    "bedroom": _bedroom, "bathroom": _bathroom, "kitchen": _kitchen, "living_room": _living_room,
    "office": _office, "dining_room": _dining_room, "classroom": _classroom,
}

# Room footprint (x, y) ranges; kept so that the far corner stays within Kinect-like 10 m depth.
_ROOM_SIZES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "bedroom": ((3.2, 5.0), (3.2, 5.0)), "bathroom": ((2.4, 3.4), (2.6, 3.6)), "kitchen": ((3.0, 5.0), (3.0, 5.5)),
    "living_room": ((4.0, 6.5), (3.6, 6.0)), "office": ((3.2, 6.0), (3.2, 5.5)),
    "dining_room": ((3.5, 5.5), (3.5, 5.5)), "classroom": ((5.5, 7.5), (5.5, 7.0)),
}

# Shell finishes per scene type: (wall texture, wall colours, floor texture, floor colours).
_FINISHES: dict[str, tuple[str, list[tuple[float, float, float]], str, list[tuple[float, float, float]]]] = {
    "bedroom": ("paint", [(0.85, 0.8, 0.72), (0.72, 0.8, 0.86), (0.88, 0.78, 0.8)], "carpet",
                [(0.55, 0.5, 0.45), (0.4, 0.42, 0.5)]),
    "bathroom": ("tiles", [(0.9, 0.92, 0.93), (0.7, 0.82, 0.9)], "tiles", [(0.6, 0.62, 0.65), (0.85, 0.84, 0.8)]),
    "kitchen": ("paint", [(0.93, 0.9, 0.75), (0.9, 0.9, 0.88)], "big_tiles", [(0.75, 0.7, 0.62), (0.5, 0.5, 0.5)]),
    "living_room": ("paint", [(0.9, 0.84, 0.7), (0.8, 0.75, 0.68), (0.7, 0.75, 0.7)], "planks",
                    [(0.6, 0.42, 0.26), (0.72, 0.56, 0.38)]),
    "office": ("paint", [(0.9, 0.9, 0.9), (0.8, 0.82, 0.85)], "carpet", [(0.35, 0.38, 0.45), (0.42, 0.42, 0.42)]),
    "dining_room": ("paint", [(0.8, 0.6, 0.5), (0.9, 0.85, 0.75)], "planks", [(0.5, 0.32, 0.2), (0.7, 0.55, 0.4)]),
    "classroom": ("paint", [(0.8, 0.88, 0.78), (0.93, 0.9, 0.8)], "speckle", [(0.7, 0.68, 0.6), (0.6, 0.65, 0.6)]),
}


def build_room(scene_type: str, rng: np.random.Generator, *, class_tint: float = 0.0) -> Room:
    """A furnished room of `scene_type` (one of ROOM_SCENE_TYPES), random under `rng`; `class_tint` as in
    `tint_objects` (it draws nothing from `rng`, so the layout is the same at any tint)."""
    if scene_type not in _RECIPES:
        raise ValueError(f"no room recipe for scene type {scene_type!r}; known: {', '.join(ROOM_SCENE_TYPES)}")
    (x0, x1), (y0, y1) = _ROOM_SIZES[scene_type]
    height = _u(rng, 2.7, 3.1) if scene_type == "classroom" else _u(rng, 2.4, 2.8)
    size = np.array([_u(rng, x0, x1), _u(rng, y0, y1), height])
    lay = _Layout(rng, size)
    # Reserve a free square for the camera before furnishing, so every room has somewhere to stand. It lies near
    # a wall (where a person filming a room stands), leaving the middle of the room to the furniture.
    half = 0.45
    centre = rng.uniform([0.9, 0.9], size[:2] - 0.9)
    axis = int(rng.integers(2))
    centre[axis] = _u(rng, 0.55, 0.9) if rng.random() < 0.5 else size[axis] - _u(rng, 0.55, 0.9)
    zone = np.array([centre - half, centre + half])
    lay.block(np.array([[zone[0, 0], zone[0, 1], 0.0], [zone[1, 0], zone[1, 1], height]]))
    # The scene's own furniture first, so the pieces that define the room type always find a place.
    _RECIPES[scene_type](lay, rng)
    _wall_decor(lay, rng, scene_type)
    for obj in lay.objects:
        if obj.is_class and obj.name not in SCENE_CLASSES[scene_type]:
            raise AssertionError(f"recipe {scene_type} placed {obj.name}, outside SCENE_CLASSES")
    tint_objects(lay.objects, class_tint)
    wall_tex, wall_cols, floor_tex, floor_cols = _FINISHES[scene_type]
    wall = Material(_jit(rng, _pick(rng, wall_cols), 0.04), wall_tex, accent=(0.75, 0.75, 0.75))
    floor = Material(_jit(rng, _pick(rng, floor_cols), 0.05), floor_tex, accent=(0.3, 0.3, 0.3))
    ceiling = Material(_jit(rng, (0.93, 0.93, 0.92), 0.02), "plain")
    light = np.array([_u(rng, 0.3, 0.7) * size[0], _u(rng, 0.3, 0.7) * size[1], height - 0.05])
    return Room(scene_type=scene_type, size=size, wall=wall, floor=floor, ceiling=ceiling, objects=lay.objects,
                light=light, ambient=_u(rng, 0.35, 0.5), camera_zone=zone)


def sample_camera(room: Room, rng: np.random.Generator, intrinsics: Intrinsics, *,
                  max_distance: float = 0.0) -> Camera:
    """A hand-held Kinect pose: standing height, looking slightly down at the furniture from a free spot.

    `max_distance` > 0 (metres): pick the piece of furniture to film first and stand within that horizontal
    distance of its centre when a free spot is there, so it fills more of the picture (0: anywhere in the room,
    the default; its random draws are unchanged by this option)."""
    size = room.size
    # Keep the camera 0.45 m clear of everything seen from above (wall cabinets hang at head height).
    floor_boxes = [o.aabb() for o in room.objects]
    position: np.ndarray | None = None
    targets = [o for o in room.objects if o.is_class]
    if max_distance > 0 and targets:
        return _camera_near(room, rng, intrinsics, targets[int(rng.integers(len(targets)))], max_distance,
                            floor_boxes)
    for _ in range(60):
        xy = rng.uniform([0.35, 0.35], size[:2] - 0.35)
        if _clear_of(xy, floor_boxes):
            position = np.array([xy[0], xy[1], 0.0])
            break
    position = _hand_held(position, room, rng)
    # Aim at a piece of furniture most of the time (what a person filming a room does), else at the room's middle.
    if targets and rng.random() < 0.8:
        t = targets[int(rng.integers(len(targets)))]
        target = t.position + np.array([0.0, 0.0, t.height / 2])
    else:
        target = np.array([size[0] / 2, size[1] / 2, 0.8])
    return _aim(position, target, rng, intrinsics)


def _camera_near(room: Room, rng: np.random.Generator, intrinsics: Intrinsics, obj: SceneObject,
                 max_distance: float, floor_boxes: list[np.ndarray]) -> Camera:
    """A pose within `max_distance` (horizontally) of `obj`'s centre, clear of the furniture, aimed at `obj`;
    where no such spot is free, the room's camera zone (aimed at `obj` all the same)."""
    size = room.size
    centre = obj.position[:2]
    position: np.ndarray | None = None
    for _ in range(60):
        radius = _u(rng, 0.6, max(max_distance, 0.7))
        angle = _u(rng, -math.pi, math.pi)
        xy = centre + radius * np.array([math.cos(angle), math.sin(angle)])
        if np.any(xy < 0.35) or np.any(xy > size[:2] - 0.35):
            continue
        if _clear_of(xy, floor_boxes):
            position = np.array([xy[0], xy[1], 0.0])
            break
    position = _hand_held(position, room, rng)
    return _aim(position, obj.position + np.array([0.0, 0.0, obj.height / 2]), rng, intrinsics)


def _clear_of(xy: np.ndarray, floor_boxes: list[np.ndarray]) -> bool:
    """Whether a floor spot keeps 0.45 m from every piece of furniture's footprint."""
    return all(np.any(xy < b[0, :2] - 0.45) or np.any(xy > b[1, :2] + 0.45) for b in floor_boxes)


def _hand_held(position: np.ndarray | None, room: Room, rng: np.random.Generator) -> np.ndarray:
    """The floor spot found (or, when none was free, one in the room's camera zone) at a hand-held height."""
    if position is None:
        zone = room.camera_zone
        xy = rng.uniform(zone[0] + 0.1, zone[1] - 0.1)
        position = np.array([xy[0], xy[1], 0.0])
    position[2] = _u(rng, 1.05, min(1.75, room.size[2] - 0.3))
    return position


def _aim(position: np.ndarray, target: np.ndarray, rng: np.random.Generator, intrinsics: Intrinsics) -> Camera:
    """The camera at `position` looking at `target`, with a hand-held jitter of yaw, pitch and roll."""
    delta = target - position
    yaw = math.atan2(delta[1], delta[0]) + rng.normal(0, 0.2)
    dist = max(float(np.hypot(delta[0], delta[1])), 0.5)
    pitch = float(np.clip(math.atan2(position[2] - target[2], dist) + rng.normal(0, 0.08), 0.0, 0.6))
    roll = float(rng.normal(0, 0.03))
    return Camera(position=position, rotation=camera_rotation(yaw, pitch, roll), intrinsics=intrinsics)
