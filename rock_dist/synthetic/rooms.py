"""Synthetic rooms in the official NYU Depth v2 layout: a data set that can be learned, without the 2.8 GB download.

Each image is ray-cast (`rock_dist.synthetic.geometry`) from a furnished room (`rock_dist.synthetic.scenes`) seen
by a hand-held Kinect with NYU's intrinsics. Depth and surface normals come exactly from the geometry; labels and
instance numbers from which object each pixel's ray hits first, so occlusion is exact and an object has a box only
where it is visible. Colour comes from class-specific materials and textures, shaded by a ceiling light. Raw depth
gets Kinect-like holes (projector shadows at depth edges, beyond range, on screens, glass and glossy ceramics, at
grazing angles) while `depths` stays hole-filled, as in the official file.

The quickstart, the tests of the whole pipeline and the README's baseline-vs-ROCK table build their data with
`make_rooms_dataset`, or from the command line:

    python -m rock_dist.synthetic.rooms --out data/rooms --num_images 200 --seed 0 [--height 240 --width 320]

then shard it with `python -m rock_dist.shards build` like the real files.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from rock_dist.config import RoomsConfig, parse_config
from rock_dist.data.constants import NYU_LABEL_IDS, class_id, scene_id
from rock_dist.errors import ConfigError
from rock_dist.invocation import command_name
from rock_dist.synthetic.geometry import FACE_NEG_Z, FACE_POS_Z, Camera, CastResult, Intrinsics, cast_room
from rock_dist.synthetic.official_layout import (OfficialPaths, allocate_official_arrays, official_like_names,
                                                 write_official_layout)
from rock_dist.synthetic.scenes import (DISTRACTOR_IDS, NYU_CEILING, NYU_FLOOR, NYU_WALL, ROOM_SCENE_TYPES,
                                        SCENE_CLASSES, Material, Room, build_room, sample_camera)

_NYU_TO_CLASS = {nyu: class_id(name) for name, nyu in NYU_LABEL_IDS.items()}


# ------------------------------------------------------------------------------------------------------ textures
def _hash01(i: np.ndarray, j: np.ndarray, seed: int) -> np.ndarray:
    """A float in [0, 1) per integer lattice cell (i, j): stable value noise without storing a texture."""
    h = (i.astype(np.int64) * 73856093) ^ (j.astype(np.int64) * 19349663) ^ (seed * 83492791)
    h &= 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0x5BD1E995) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0xFFFFFF).astype(np.float32) / np.float32(1 << 24)


def _cells(u: np.ndarray, v: np.ndarray, size: float, seed: int) -> np.ndarray:
    return _hash01(np.floor(u / size), np.floor(v / size), seed)


def _lines(x: np.ndarray, period: float, width: float, offset: float = 0.0) -> np.ndarray:
    """True within `width`/2 of the lines x = offset + k * period."""
    r = np.mod(x - offset + width / 2, period)
    return r < width


def _texture(name: str, u: np.ndarray, v: np.ndarray, su: float, sv: float, base: np.ndarray, accent: np.ndarray,
             seed: int) -> np.ndarray:
    """Albedo (N, 3) of pattern `name` at face coordinates (u, v) metres; (su, sv) the face's half sizes.

    Box faces have (u, v) relative to the face centre (v up on vertical faces); room surfaces have world
    coordinates and infinite half sizes. Patterns are scale-true (a shelf is 35 cm whatever the image size).
    """
    n = u.shape[0]
    col = np.broadcast_to(base, (n, 3)).astype(np.float32).copy()
    acc = np.broadcast_to(accent, (n, 3)).astype(np.float32)

    def mix(mask: np.ndarray, colour: np.ndarray | Sequence[float], amount: float = 1.0) -> None:
        c = np.broadcast_to(np.asarray(colour, dtype=np.float32), (n, 3))
        col[mask] = col[mask] * (1 - amount) + c[mask] * amount

    def near_edge(width: float) -> np.ndarray:
        return (np.abs(u) > su - width) | (np.abs(v) > sv - width)

    if name == "plain":
        col *= (0.97 + 0.06 * _cells(u, v, 0.05, seed))[:, None]
    elif name == "paint":
        col *= (0.99 + 0.015 * _cells(u, v, 0.3, seed))[:, None]
    elif name == "wood":
        grain = np.sin(2 * np.pi * (v * 9.0 + 0.6 * np.sin(u * 2.3 + seed)))
        col *= (0.9 + 0.08 * grain + 0.04 * _cells(u, v * 6, 0.25, seed))[:, None]
    elif name == "fabric":
        weave = np.sin(u * 90.0) * np.sin(v * 90.0)
        col *= (0.93 + 0.05 * weave + 0.04 * _cells(u, v, 0.04, seed))[:, None]
    elif name == "sheet":  # a blanket over the foot end of the bed, folded back near the pillows
        col *= (0.95 + 0.04 * np.sin(u * 40.0))[:, None]
        mix(v > -sv + 0.65, acc, 0.85)
    elif name == "pillow":
        col *= (0.96 + 0.04 * np.sin(u * 60.0))[:, None]
        mix(near_edge(0.025), acc, 0.8)
    elif name == "shelves":  # a bookshelf seen from the front: frame, shelf boards, rows of coloured books
        shelf_h = 0.36
        row = np.floor((v + sv) / shelf_h)
        in_row = np.mod(v + sv, shelf_h)
        book_w = 0.035
        book = np.floor((u + su) / book_w)
        hue = _hash01(book, row, seed)
        height = 0.55 + 0.4 * _hash01(book, row, seed + 7)
        book_col = np.stack([0.25 + 0.6 * np.abs(np.sin(6.3 * hue)), 0.2 + 0.5 * np.abs(np.sin(6.3 * hue + 2.1)),
                             0.2 + 0.5 * np.abs(np.sin(6.3 * hue + 4.2))], axis=1)
        inside = ~near_edge(0.035) & (in_row > 0.025)
        is_book = inside & (in_row < 0.025 + height * (shelf_h - 0.025)) & (_hash01(book, row, seed + 3) > 0.12)
        mix(inside & ~is_book, col * 0.35)
        col[is_book] = book_col[is_book]
    elif name == "drawers":
        count = max(1, int(round(2 * sv / 0.22)))
        pitch = 2 * sv / count
        mix(_lines(v + sv, pitch, 0.012) & ~near_edge(0.01), acc, 0.9)
        centre = np.mod(v + sv, pitch) - pitch / 2
        mix((np.abs(u) < 0.05) & (np.abs(centre) < 0.012), acc)
        mix(near_edge(0.012), col * 0.8)
    elif name == "cabinet":
        doors = max(1, int(round(2 * su / 0.55)))
        pitch = 2 * su / doors
        mix(_lines(u + su, pitch, 0.01) | (np.abs(v - (sv - 0.16)) < 0.005), acc, 0.8)
        knob = (np.abs(np.mod(u + su, pitch) - pitch + 0.05) < 0.012) & (np.abs(v - (sv - 0.28)) < 0.03)
        mix(knob, (0.6, 0.6, 0.62))
        mix(near_edge(0.01), col * 0.85)
    elif name == "door":  # four recessed panels with moulded edges, and a knob at 1 m
        z = v + sv

        def panels(inset: float) -> np.ndarray:
            across = (np.abs(u) > 0.05 + inset) & (np.abs(u) < su - 0.1 - inset)
            rows = ((z > 0.15 + inset) & (z < 0.95 - inset)) | ((z > 1.1 + inset) & (z < 2 * sv - 0.15 - inset))
            return across & rows

        outer = panels(0.0)
        mix(outer, col * 0.9)
        mix(outer & ~panels(0.015), col * 0.7)
        mix((np.abs(u - (su - 0.08)) < 0.03) & (np.abs(z - 1.0) < 0.03), acc)
        mix(near_edge(0.04), col * 0.93)
    elif name == "screen":  # a bezel around a dark glossy panel with a faint picture
        inner = ~near_edge(0.025)
        picture = acc * (0.6 + 0.5 * (0.5 + 0.5 * np.sin(u[:, None] * 5.0 + v[:, None] * 3.0 + np.array([0, 2, 4])
                                                         + seed)))
        gradient = (0.75 + 0.35 * (v + sv) / (2 * sv))[:, None]
        col[inner] = (picture * gradient)[inner]
    elif name == "basin":  # the bowl of a sink, bathtub or toilet, seen from above
        r = (u / (0.82 * su)) ** 2 + (v / (0.78 * sv)) ** 2
        mix(r < 1.0, acc)
        mix((r < 1.0) & (r > 0.85), acc * 0.85)
        mix(r < 0.03, (0.3, 0.3, 0.32))
    elif name == "cardboard":
        col *= (0.93 + 0.07 * _cells(u, v, 0.02, seed))[:, None]
    elif name == "tape":
        col *= (0.93 + 0.07 * _cells(u, v, 0.02, seed))[:, None]
        mix(np.abs(u) < 0.025, acc)
    elif name == "ribbed":
        col *= (0.9 + 0.1 * np.abs(np.sin(u * 70.0)))[:, None]
    elif name == "bin_top":
        mix((np.abs(u) < su - 0.02) & (np.abs(v) < sv - 0.02), acc)
    elif name == "window":  # a bright pane with a white frame and a cross bar
        mix(near_edge(0.05) | (np.abs(u) < 0.025) | (np.abs(v) < 0.02), acc)
        col *= (0.95 + 0.1 * (v + sv) / (2 * sv))[:, None]
    elif name == "picture":
        t = ((u + su) / (2 * su) * 0.6 + (v + sv) / (2 * sv) * 0.4)[:, None]
        col = col * (1 - t) + acc * t
        col *= (0.85 + 0.15 * np.sin(u * 13.0 + seed) * np.sin(v * 11.0))[:, None]
        mix(near_edge(0.03), (0.12, 0.1, 0.08))
    elif name == "whiteboard":
        mix(near_edge(0.03), acc)
        mix(~near_edge(0.03) & (_cells(u * 3, v * 12, 0.2, seed) > 0.97), (0.2, 0.25, 0.6))
    elif name == "tiles":
        col *= (0.94 + 0.08 * _cells(u, v, 0.2, seed))[:, None]
        mix(_lines(u, 0.2, 0.006) | _lines(v, 0.2, 0.006), (0.8, 0.8, 0.78), 0.8)
    elif name == "big_tiles":
        col *= (0.93 + 0.1 * _cells(u, v, 0.45, seed))[:, None]
        mix(_lines(u, 0.45, 0.008) | _lines(v, 0.45, 0.008), col * 0.7)
    elif name == "planks":
        plank = np.floor(v / 0.16)
        shift = _hash01(plank, plank * 0, seed) * 1.2
        piece = np.floor((u + shift) / 1.2)
        col *= (0.85 + 0.25 * _hash01(plank, piece, seed + 1))[:, None]
        col *= (0.94 + 0.06 * np.sin(2 * np.pi * (v * 30.0 + 0.3 * np.sin(u * 4.0))))[:, None]
        mix(_lines(v, 0.16, 0.006) | _lines(u + shift, 1.2, 0.006), col * 0.6)
    elif name == "carpet":
        col *= (0.88 + 0.12 * _cells(u, v, 0.02, seed) + 0.05 * _cells(u, v, 0.3, seed + 1))[:, None]
    elif name == "speckle":
        col *= (0.95 + 0.05 * _cells(u, v, 0.15, seed))[:, None]
        mix(_cells(u, v, 0.015, seed + 2) > 0.85, col * 0.7)
    else:
        raise ValueError(f"unknown texture {name!r}")
    return col


# ----------------------------------------------------------------------------------------------------- rendering
@dataclass
class RenderedView:
    """One rendered image and its annotations (the per-image content of the official file).

    image (H, W, 3) uint8; depth (H, W) float32 metres, exact; raw_depth (H, W) float32 with 0 holes; labels
    (H, W) uint16 NYU ids; instances (H, W) uint8; normals (H, W, 3) float32 unit, camera frame, facing the camera;
    normal_mask (H, W) bool; boxes (K, 4) int64 inclusive xyxy of the visible detection-class objects and
    box_labels (K,) int64 class ids 1..19, in the reader's (class, instance) order; objects: the room's object
    index of each box.
    """

    image: np.ndarray
    depth: np.ndarray
    raw_depth: np.ndarray
    labels: np.ndarray
    instances: np.ndarray
    normals: np.ndarray
    normal_mask: np.ndarray
    boxes: np.ndarray
    box_labels: np.ndarray
    objects: list[int]


def default_min_object_pixels(height: int, width: int) -> int:
    """Smallest visible area (pixels) that makes an object a detection target: ~0.03 % of the image, at least 6.

    Slivers of a few pixels behind other furniture are not objects anyone could detect; NYU annotators also left
    such fragments without instances.
    """
    return max(6, (height * width) // 3000)


def _albedo(room: Room, cast: CastResult, boxes_material: list[Material], boxes_half: list[np.ndarray],
            seeds: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel albedo (H, W, 3) and material flags (emissive, specular, dark_ir, glass) of what each ray hit."""
    h, w = cast.depth.shape
    albedo = np.empty((h, w, 3), np.float32)
    emissive = np.zeros((h, w), bool)
    specular = np.zeros((h, w), bool)
    dark_ir = np.zeros((h, w), bool)
    glass = np.zeros((h, w), bool)
    part, face = cast.part, cast.face
    inf = float("inf")

    shell = part < 0
    for face_ids, mat, seed in (((FACE_NEG_Z,), room.floor, 1), ((FACE_POS_Z,), room.ceiling, 2),
                                ((0, 1, 2, 3), room.wall, 3)):
        m = shell & np.isin(face, face_ids)
        if m.any():
            uv = cast.uv[m]
            albedo[m] = _texture(mat.texture, uv[:, 0], uv[:, 1], inf, inf, np.asarray(mat.color),
                                 np.asarray(mat.accent), seed)
    # Group pixels by (part, face) with one sort, so each face is textured in one vectorised call.
    ys, xs = np.nonzero(~shell)
    if ys.size:
        key = part[ys, xs].astype(np.int64) * 8 + face[ys, xs]
        order = np.argsort(key, kind="stable")
        key, ys, xs = key[order], ys[order], xs[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        ends = np.r_[starts[1:], key.size]
        for s, e in zip(starts, ends):
            k, f = divmod(int(key[s]), 8)
            mat = boxes_material[k]
            hx, hy, hz = boxes_half[k]
            su, sv = {0: (hy, hz), 1: (hx, hz), 2: (hx, hy)}[f // 2]
            py, px = ys[s:e], xs[s:e]
            uv = cast.uv[py, px]
            albedo[py, px] = _texture(mat.texture_of_face(f), uv[:, 0], uv[:, 1], su, sv, np.asarray(mat.color),
                                      np.asarray(mat.accent), seeds[k])
            emissive[py, px] = mat.emissive
            specular[py, px] = mat.specular
            dark_ir[py, px] = mat.dark_ir and f == 2
            glass[py, px] = mat.emissive and mat.specular
    return albedo, emissive, specular, dark_ir, glass


def _shade(room: Room, cast: CastResult, camera: Camera, albedo: np.ndarray, emissive: np.ndarray,
           specular: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lambert shading from the room's ceiling light plus ambient, a Blinn highlight on glossy surfaces, camera
    exposure/white-balance jitter and sensor noise. Returns (H, W, 3) uint8."""
    to_light = room.light.astype(np.float32) - cast.points
    dist = np.linalg.norm(to_light, axis=-1, keepdims=True)
    to_light /= np.maximum(dist, 1e-6)
    n = cast.normal_world
    diffuse = np.clip(np.sum(n * to_light, axis=-1), 0.0, 1.0)
    falloff = 1.0 / (1.0 + 0.035 * dist[..., 0] ** 2)
    shade = room.ambient + (1.0 - room.ambient) * 1.25 * diffuse * falloff
    colour = albedo * shade[..., None]
    if specular.any():
        to_cam = camera.position.astype(np.float32) - cast.points[specular]
        to_cam /= np.linalg.norm(to_cam, axis=-1, keepdims=True)
        half = to_light[specular] + to_cam
        half /= np.maximum(np.linalg.norm(half, axis=-1, keepdims=True), 1e-6)
        spec = np.clip(np.sum(n[specular] * half, axis=-1), 0, 1) ** 40
        colour[specular] += 0.5 * spec[:, None]
    colour[emissive] = albedo[emissive] * 1.05
    exposure = rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    colour = colour * exposure
    # A display-like tone curve, so dark furniture keeps some texture as in the Kinect's auto-exposed RGB.
    colour = np.clip(colour, 0.0, 1.0) ** (1 / 1.15)
    noisy = colour * 255.0 + rng.normal(0.0, 2.0, colour.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _blobs(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Blocky uniform noise (H, W) in [0, 1): holes in real raw depth come in patches, not single pixels."""
    gh, gw = -(-h // cell), -(-w // cell)
    coarse = rng.random((gh, gw)).astype(np.float32)
    return np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:h, :w]


def _raw_depth(cast: CastResult, camera: Camera, albedo: np.ndarray, specular: np.ndarray, dark_ir: np.ndarray,
               glass: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Kinect-like raw depth (H, W) float32 with 0 holes, and the edge map used for the normals mask."""
    depth = cast.depth
    h, w = depth.shape
    scale = w / 640.0
    # Depth discontinuities: neighbours whose depths differ more than the Kinect's resolution at that range.
    thr = 0.05 + 0.03 * depth
    dx = depth[:, 1:] - depth[:, :-1]
    dy = depth[1:, :] - depth[:-1, :]
    edge = np.zeros((h, w), bool)
    edge[:, :-1] |= dx > thr[:, :-1]    # right neighbour farther: it is in shadow of the near surface
    edge[:, 1:] |= -dx > thr[:, 1:]
    edge[:-1, :] |= dy > thr[:-1, :]
    edge[1:, :] |= -dy > thr[1:, :]
    holes = edge.copy()
    # Projector shadow: the IR projector sits beside the camera, so the background just left of a near object
    # gets no pattern; a band a few pixels wide (scaled with the image) goes missing there.
    left_far = np.zeros((h, w), bool)
    left_far[:, :-1] = -dx > thr[:, :-1]
    band = max(1, int(round(6 * scale)))
    shadow = left_far.copy()
    for s in range(1, band):
        shadow[:, :-s] |= left_far[:, s:]
    holes |= shadow
    # Range: nothing below ~0.5 m, nothing past a per-image far limit, increasingly patchy towards it.
    far = rng.uniform(7.0, 9.5)
    holes |= (depth < 0.5) | (depth > far)
    patches = _blobs(rng, h, w, max(2, int(round(12 * scale))))
    holes |= patches < np.clip((depth - (far - 2.5)) / 2.5, 0, 1) * 0.6
    # Materials: screens absorb the IR pattern, glass lets it through, glossy ceramics lose it in patches.
    holes |= dark_ir | glass
    holes |= specular & (_blobs(rng, h, w, max(2, int(round(8 * scale)))) < 0.35)
    # Very dark surfaces (black chairs, dark fabric) reflect little IR and read in patches.
    dark = albedo.mean(axis=-1) < 0.15
    holes |= dark & (_blobs(rng, h, w, max(2, int(round(6 * scale)))) < 0.4)
    # Grazing incidence returns too little of the pattern.
    rays = cast.points - camera.position.astype(np.float32)
    rays /= np.maximum(np.linalg.norm(rays, axis=-1, keepdims=True), 1e-6)
    holes |= np.abs(np.sum(rays * cast.normal_world, axis=-1)) < 0.1
    # Sparse random dropouts.
    holes |= _blobs(rng, h, w, max(1, int(round(4 * scale)))) < 0.015
    # Disparity quantisation: the error grows with depth squared (sigma 1.5 mm at 1 m, 5.4 cm at 6 m).
    noise = rng.normal(0.0, 1.0, (h, w)).astype(np.float32) * (0.0015 * depth ** 2)
    raw = np.where(holes, 0.0, np.maximum(depth + noise, 0.01)).astype(np.float32)
    return raw, edge


def render_view(room: Room, camera: Camera, rng: np.random.Generator, *,
                min_object_pixels: int | None = None) -> RenderedView:
    """Render `room` from `camera`: image, exact depth and normals, Kinect raw depth, labels, instances, boxes."""
    intr = camera.intrinsics
    h, w = intr.height, intr.width
    min_px = default_min_object_pixels(h, w) if min_object_pixels is None else min_object_pixels
    boxes, owner = room.boxes()
    materials = [room.objects[o].parts[i].material for o, i in _part_indices(room)]
    halves = [b.half for b in boxes]
    seeds = [int(o * 7919 + i) for o, i in _part_indices(room)]
    cast = cast_room(room.size, boxes, camera)

    albedo, emissive, specular, dark_ir, glass = _albedo(room, cast, materials, halves, seeds)
    image = _shade(room, cast, camera, albedo, emissive, specular, rng)
    raw, edge = _raw_depth(cast, camera, albedo, specular, dark_ir, glass, rng)

    # Labels: the NYU id of the hit object; the shell is floor, ceiling or wall.
    owner_arr = np.asarray(owner + [-1], dtype=np.int64)  # index -1 (shell) maps to the appended -1
    obj_of_pixel = owner_arr[cast.part]
    obj_ids = np.asarray([o.nyu_id for o in room.objects] + [0], dtype=np.int64)
    labels = obj_ids[obj_of_pixel].astype(np.uint16)
    shell = obj_of_pixel < 0
    labels[shell & (cast.face == FACE_NEG_Z)] = NYU_FLOOR
    labels[shell & (cast.face == FACE_POS_Z)] = NYU_CEILING
    walls = shell & (cast.face < 4)
    labels[walls] = NYU_WALL

    # Instances: per NYU label, visible objects are numbered 1, 2, ... in object order; fragments smaller than
    # `min_px` keep their label but get instance 0 (no box), as the reader drops only instance 0.
    instances = np.zeros((h, w), np.uint8)
    instances[walls] = (cast.face[walls] + 1).astype(np.uint8)  # each wall its own instance, as NYU does
    instances[shell & ~walls] = 1
    counts = np.bincount(obj_of_pixel[~shell], minlength=len(room.objects))
    next_instance: dict[int, int] = {}
    box_list: list[tuple[int, int, list[int]]] = []  # (class id, instance, box)
    box_objects: list[tuple[int, int, int]] = []
    ys_all, xs_all = np.nonzero(~shell)
    objs_flat = obj_of_pixel[ys_all, xs_all]
    order = np.argsort(objs_flat, kind="stable")
    objs_sorted = objs_flat[order]
    for o, obj in enumerate(room.objects):
        if counts[o] < min_px:
            continue
        lo, hi = np.searchsorted(objs_sorted, [o, o + 1])
        py, px = ys_all[order[lo:hi]], xs_all[order[lo:hi]]
        inst = next_instance.get(obj.nyu_id, 0) + 1
        if inst > 255:  # uint8 instances; never reached by the recipes, but do not wrap around silently
            continue
        next_instance[obj.nyu_id] = inst
        instances[py, px] = inst
        if obj.nyu_id in _NYU_TO_CLASS and obj.is_class:
            box = [int(px.min()), int(py.min()), int(px.max()), int(py.max())]
            box_list.append((_NYU_TO_CLASS[obj.nyu_id], inst, box))
            box_objects.append((_NYU_TO_CLASS[obj.nyu_id], inst, o))
    box_list.sort(key=lambda t: (t[0], t[1]))
    box_objects.sort()

    normals = cast.normal_cam.astype(np.float32)
    # NYU's masks mark where a normal could be estimated: measured depth, away from depth edges.
    normal_mask = (raw > 0) & ~edge
    return RenderedView(
        image=image, depth=cast.depth.astype(np.float32), raw_depth=raw, labels=labels, instances=instances,
        normals=normals, normal_mask=normal_mask,
        boxes=np.asarray([b for _, _, b in box_list], dtype=np.int64).reshape(-1, 4),
        box_labels=np.asarray([c for c, _, _ in box_list], dtype=np.int64),
        objects=[o for _, _, o in box_objects])


def _part_indices(room: Room) -> list[tuple[int, int]]:
    """(object index, part index) of each box in `room.boxes()` order."""
    return [(o, i) for o, obj in enumerate(room.objects) for i in range(len(obj.parts))]


def largest_box_fraction(view: RenderedView) -> float:
    """Area of the view's largest box as a fraction of the image (0 without boxes)."""
    if len(view.boxes) == 0:
        return 0.0
    boxes = np.asarray(view.boxes, dtype=np.float64)  # x1 y1 x2 y2, inclusive pixel corners
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    return float(areas.max() / view.depth.size)


def render_scene_views(room: Room, num_views: int, intrinsics: Intrinsics, rng: np.random.Generator, *,
                       min_object_pixels: int | None = None, tries: int = 8,
                       camera_distance: float = 0.0, max_object_area: float = 1.0) -> list[RenderedView]:
    """`num_views` views of one room (one NYU scene instance), each showing at least one detection target when
    the room allows it within `tries` camera draws, not blocked by something right in front of the lens, and
    with no box over `max_object_area` of the image (a close-up that one object fills).
    `camera_distance` > 0: the camera stands within that many metres of the object it films (`sample_camera`)."""
    views: list[RenderedView] = []
    for _ in range(num_views):
        best: RenderedView | None = None
        for _ in range(tries):
            camera = sample_camera(room, rng, intrinsics, max_distance=camera_distance)
            view = render_view(room, camera, rng, min_object_pixels=min_object_pixels)
            clear = float(np.mean(view.depth < 0.6)) < 0.2 and largest_box_fraction(view) <= max_object_area
            if best is None or (len(view.boxes) > len(best.boxes) and clear):
                best = view
            if len(view.boxes) > 0 and clear:
                best = view
                break
        assert best is not None
        views.append(best)
    return views


# ------------------------------------------------------------------------------------------------------- dataset
def room_names() -> list[str]:
    """The 894-entry `names` vocabulary: the 19 classes plus the shell and distractor names at their NYU ids."""
    names = official_like_names()
    for name, nyu in {**DISTRACTOR_IDS, "wall": NYU_WALL, "floor": NYU_FLOOR, "ceiling": NYU_CEILING}.items():
        names[nyu - 1] = name
    return names


def _split_scenes(scene_types: list[str], rng: np.random.Generator, train_fraction: float,
                  val_fraction: float) -> tuple[list[int], list[int], list[int]]:
    """Train, test and val scene indices. Scenes are lined up type by type and every (1/train_fraction)-th goes
    to train (systematic sampling with a random phase): the split has the requested size and is stratified by
    scene type, even for a handful of scenes. Val takes whole training scenes, at least one train scene stays."""
    order: list[int] = []
    kinds = list(dict.fromkeys(scene_types))
    for t in (kinds[int(i)] for i in rng.permutation(len(kinds))):
        members = [k for k, s in enumerate(scene_types) if s == t]
        order += [members[int(i)] for i in rng.permutation(len(members))]
    phase = float(rng.random())
    train = [k for j, k in enumerate(order)
             if math.floor((j + 1) * train_fraction + phase) > math.floor(j * train_fraction + phase)]
    test = [k for k in order if k not in set(train)]
    if not train:
        train.append(test.pop())
    if not test and len(train) > 1:
        test.append(train.pop())
    val: list[int] = []
    if len(train) > 2 and val_fraction > 0:
        n_val = min(max(1, int(round(val_fraction * len(train)))), len(train) - 1)
        val = sorted(int(train[int(i)]) for i in rng.permutation(len(train))[:n_val])
    return sorted(train), sorted(test), val


@dataclass(frozen=True)
class _SceneJob:
    """Everything one scene instance's views depend on (picklable, for the worker processes)."""

    seed: int
    index: int
    scene_type: str
    num_views: int
    intrinsics: Intrinsics
    class_tint: float
    min_object_pixels: int | None
    camera_distance: float
    max_object_area: float


def _render_scene(job: _SceneJob) -> list[RenderedView]:
    # Each scene instance has its own stream, so a room looks the same whatever else is generated, and in
    # whichever process.
    rng = np.random.default_rng([job.seed, job.index, 0x200])
    room = build_room(job.scene_type, rng, class_tint=job.class_tint)
    return render_scene_views(room, job.num_views, job.intrinsics, rng, min_object_pixels=job.min_object_pixels,
                              camera_distance=job.camera_distance, max_object_area=job.max_object_area)


def _render_scenes(jobs: Sequence[_SceneJob], workers: int) -> Iterator[list[RenderedView]]:
    """The views of each job, in order; rendered in `workers` processes when there is more than one."""
    if workers <= 1 or len(jobs) < 2:
        yield from map(_render_scene, jobs)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        # A few scenes per task: each view is a few milliseconds of numpy, so one scene per task would spend a
        # noticeable share of the time pickling.
        yield from pool.map(_render_scene, jobs, chunksize=4)


def make_rooms_dataset(out_dir: str | os.PathLike[str], n: int, seed: int, height: int = 480, width: int = 640, *,
                       scene_types: Sequence[str] = ROOM_SCENE_TYPES, images_per_scene: int = 3,
                       train_fraction: float = 0.55, val_fraction: float = 0.15,
                       min_object_pixels: int | None = None, min_object_area: float = 0.0,
                       camera_distance: float = 0.0, max_object_area: float = 1.0,
                       normals_as_tgz: bool = False, class_tint: float = 0.0, workers: int = 1,
                       progress: Callable[[int, int], None] | None = None) -> OfficialPaths:
    """Render `n` synthetic room images and write them in the official NYUv2 layout under `out_dir`.

    Scene instances (`bedroom_0003`, ...) hold `images_per_scene` views each and are spread evenly over
    `scene_types`; train/test are split by scene instance (about `train_fraction` train, like NYU's 795/654) and
    `val_fraction` of the training scenes are listed in val_split.txt (NYU's 122 of 795). Everything depends only
    on `seed` (and the arguments). `class_tint` blends each class toward its own colour (`scenes.tint_objects`;
    the layouts and views do not change with it). `min_object_area` (a fraction of the image; 0: the default) or
    `min_object_pixels` sets the smallest visible object that gets a box (`default_min_object_pixels`);
    `camera_distance` > 0 keeps the camera within that many metres of the object it films (0: anywhere);
    `max_object_area` < 1 redraws a view (up to 8 camera draws) whose largest box covers more of the image.
    Also writes `ground_truth.json` (boxes, labels, scene, split per image).
    `workers` > 1 renders the scenes in that many processes (the files do not depend on it: each scene instance
    draws from its own random stream). `progress(done, n)` is called after each image.
    """
    if n < 2:
        raise ConfigError(f"--num_images {n}: need at least 2 images (one train and one test scene)")
    if height < 16 or width < 16:
        raise ConfigError(f"--height/--width {height}x{width}: images must be at least 16x16")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: must be at least 1")
    if images_per_scene < 1:
        raise ConfigError(f"--images_per_scene {images_per_scene}: must be at least 1")
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(f"--train_fraction {train_fraction}: must be between 0 and 1 (exclusive)")
    if not 0.0 <= class_tint <= 1.0:
        raise ConfigError(f"--class_tint {class_tint}: must be between 0 and 1")
    if not 0.0 <= min_object_area < 1.0:
        raise ConfigError(f"--min_object_area {min_object_area}: must be a fraction of the image in [0, 1)")
    if camera_distance < 0:
        raise ConfigError(f"--camera_distance {camera_distance}: must be 0 (anywhere) or a distance in metres")
    if not min_object_area < max_object_area <= 1.0:
        raise ConfigError(f"--max_object_area {max_object_area}: must be a fraction of the image in "
                          f"(--min_object_area {min_object_area}, 1]")
    if min_object_area > 0:
        min_object_pixels = max(default_min_object_pixels(height, width), round(min_object_area * height * width))
    unknown = [t for t in scene_types if t not in SCENE_CLASSES]
    if unknown or not scene_types:
        raise ConfigError(f"scene types {unknown or '(none)'}: choose from {', '.join(ROOM_SCENE_TYPES)}")
    intr = Intrinsics.nyu(height, width)

    num_scenes = max(-(-n // images_per_scene), 2)
    views_per_scene = [n // num_scenes + (1 if k < n % num_scenes else 0) for k in range(num_scenes)]
    top = np.random.default_rng([seed, 0x5CE7E])
    # Balanced scene types (each type equally often, shuffled), numbered per type like NYU's `bedroom_0003`.
    types = [scene_types[k % len(scene_types)] for k in range(num_scenes)]
    types = [types[int(i)] for i in top.permutation(num_scenes)]
    counters: dict[str, int] = {}
    scene_names: list[str] = []
    for t in types:
        counters[t] = counters.get(t, 0) + 1
        scene_names.append(f"{t}_{counters[t]:04d}")

    images, depths, raw_depths, labels, instances, normals, masks = allocate_official_arrays(n, height, width)
    image_scene: list[int] = []
    truth: dict[int, dict[str, Any]] = {}
    i = 0
    jobs = [_SceneJob(seed, k, t, count, intr, class_tint, min_object_pixels, camera_distance, max_object_area)
            for k, (t, count) in enumerate(zip(types, views_per_scene))]
    for k, views in enumerate(_render_scenes(jobs, workers)):
        t = types[k]
        for view in views:
            images[i], depths[i], raw_depths[i] = view.image, view.depth, view.raw_depth
            labels[i], instances[i] = view.labels, view.instances
            normals[i], masks[i] = view.normals, view.normal_mask
            truth[i] = {"boxes": view.boxes.tolist(), "labels": view.box_labels.tolist(), "scene_id": scene_id(t),
                        "scene_type": t, "scene_name": scene_names[k]}
            image_scene.append(k)
            i += 1
            if progress is not None:
                progress(i, n)

    train_s, test_s, val_s = _split_scenes(types, top, train_fraction, val_fraction)
    train_set, val_set = set(train_s), set(val_s)
    train_idx = [j for j in range(n) if image_scene[j] in train_set]
    test_idx = [j for j in range(n) if image_scene[j] not in train_set]
    for j in range(n):
        s = image_scene[j]
        truth[j]["split"] = "val" if s in val_set else ("train" if s in train_set else "test")
    return write_official_layout(
        out_dir, images=images, depths=depths, raw_depths=raw_depths, labels=labels, instances=instances,
        scene_types=[types[s] for s in image_scene], scenes=[scene_names[s] for s in image_scene],
        normals=normals, normal_masks=masks, train_idx=train_idx, test_idx=test_idx,
        val_scenes=[scene_names[s] for s in val_s] or None, names=room_names(), normals_as_tgz=normals_as_tgz,
        ground_truth=truth)


# ----------------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rock_dist.synthetic.rooms --out DIR --num_images N --seed S [--height H --width W]`."""
    cfg = parse_config(RoomsConfig, argv, prog=command_name("rock_dist.synthetic.rooms"))
    start = time.perf_counter()
    step = max(1, cfg.num_images // 20)

    def progress(done: int, total: int) -> None:
        if not cfg.quiet and (done == total or done % step == 0):
            rate = done / max(time.perf_counter() - start, 1e-9)
            print(f"rendered {done}/{total} images ({rate:.1f} images/s)", file=sys.stderr, flush=True)

    paths = make_rooms_dataset(cfg.out, cfg.num_images, cfg.seed, cfg.height, cfg.width,
                               scene_types=tuple(cfg.scene_types) or ROOM_SCENE_TYPES,
                               images_per_scene=cfg.images_per_scene, train_fraction=cfg.train_fraction,
                               min_object_area=cfg.min_object_area, camera_distance=cfg.camera_distance,
                               max_object_area=cfg.max_object_area,
                               normals_as_tgz=cfg.normals_as_tgz,
                               class_tint=cfg.class_tint, workers=cfg.workers or min(os.cpu_count() or 1, 8),
                               progress=progress)
    # One `flag value` line per file: the arguments of `python -m rock_dist.shards build`.
    print(f"dataset_path {paths.dataset_path}")
    print(f"splits_path {paths.splits_path}")
    print(f"normals_path {paths.normals_path}")
    print(f"val_split_path {paths.val_split_path or ''}")
    print(f"ground_truth_path {paths.ground_truth_path}")
    return 0


__all__ = ["make_rooms_dataset", "render_view", "render_scene_views", "RenderedView", "room_names",
           "default_min_object_pixels", "main"]

if __name__ == "__main__":
    from rock_dist.cli import run_cli

    run_cli(main)
