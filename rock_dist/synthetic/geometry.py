"""Ray casting of box-built rooms for the synthetic NYUv2-like data set (`rock_dist.synthetic.rooms`).

A room is the axis-aligned box [0, Lx] x [0, Ly] x [0, Lz] in world coordinates (metres, z up; the floor is z = 0);
furniture is a list of boxes rotated about the vertical axis. The camera is a pinhole with NYU's Kinect intrinsics
and the OpenCV/NYU camera frame (x right, y down, z along the optical axis). Every pixel's ray is cast against all
boxes at once with the slab method, so one 480x640 image costs a few NumPy passes per box, and only over the pixel
rectangle that the box can cover on screen.

Called by `rock_dist.synthetic.scenes` (visibility checks) and `rock_dist.synthetic.rooms` (rendering).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# NYU Depth v2 RGB camera at 640x480 (Silberman et al.'s toolbox, camera_params.m).
NYU_FX, NYU_FY, NYU_CX, NYU_CY = 518.8579, 519.4696, 325.5824, 253.7362
NYU_WIDTH, NYU_HEIGHT = 640, 480

# A ray entering a box closer than this is treated as starting inside it (the camera is never placed in furniture).
_T_EPS = 1e-4

# Face ids of a box (and of the room): axis * 2 + (1 if the outward normal points to the negative side else 0).
FACE_POS_X, FACE_NEG_X, FACE_POS_Y, FACE_NEG_Y, FACE_POS_Z, FACE_NEG_Z = range(6)


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels for an image of `height` x `width`; pixel (v, u) looks along ((u-cx)/fx, ...)."""

    fx: float
    fy: float
    cx: float
    cy: float
    height: int
    width: int

    @classmethod
    def nyu(cls, height: int = NYU_HEIGHT, width: int = NYU_WIDTH) -> "Intrinsics":
        """NYU's Kinect intrinsics scaled to `height` x `width` (each axis scaled on its own, as a resize would)."""
        if height < 2 or width < 2:
            raise ValueError(f"image size must be at least 2x2, got {height}x{width}")
        sx, sy = width / NYU_WIDTH, height / NYU_HEIGHT
        # Pixel centres map by (p + 0.5) * s - 0.5 under a resize; keeps the principal point at the same spot.
        return cls(NYU_FX * sx, NYU_FY * sy, (NYU_CX + 0.5) * sx - 0.5, (NYU_CY + 0.5) * sy - 0.5, height, width)

    def rays(self) -> np.ndarray:
        """Camera-frame ray directions (H, W, 3) float32 with z = 1, so a hit at parameter t has depth exactly t."""
        u = (np.arange(self.width, dtype=np.float32) - np.float32(self.cx)) / np.float32(self.fx)
        v = (np.arange(self.height, dtype=np.float32) - np.float32(self.cy)) / np.float32(self.fy)
        rays = np.empty((self.height, self.width, 3), dtype=np.float32)
        rays[..., 0] = u[None, :]
        rays[..., 1] = v[:, None]
        rays[..., 2] = 1.0
        return rays


def rot_z(yaw: float) -> np.ndarray:
    """3x3 rotation about the world's vertical axis by `yaw` radians (counter-clockwise seen from above)."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def camera_rotation(yaw: float, pitch: float, roll: float = 0.0) -> np.ndarray:
    """Camera-to-world rotation: columns are the camera's x (right), y (down), z (forward) axes in world coordinates.

    `yaw` is the heading of the optical axis from the world x axis, `pitch` > 0 tilts it down, `roll` turns the image
    clockwise about the optical axis.
    """
    forward = np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), -math.sin(pitch)])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])  # forward x up, already unit since up is vertical
    down = np.cross(forward, right)
    c, s = math.cos(roll), math.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    return np.stack([right, down, forward], axis=1)


@dataclass
class Box:
    """A box of half sizes `half` (local x, y, z) centred at `center`, rotated about the vertical axis by `yaw`."""

    center: np.ndarray
    half: np.ndarray
    yaw: float = 0.0
    rotation: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.center = np.asarray(self.center, dtype=np.float64)
        self.half = np.asarray(self.half, dtype=np.float64)
        if self.half.shape != (3,) or np.any(self.half <= 0):
            raise ValueError(f"box half sizes must be 3 positive numbers, got {self.half}")
        self.rotation = rot_z(self.yaw)

    def corners(self) -> np.ndarray:
        """The 8 corners in world coordinates, (8, 3)."""
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
        return self.center + (signs * self.half) @ self.rotation.T

    def footprint_aabb(self) -> tuple[float, float, float, float]:
        """World-axis-aligned bounds (x0, y0, x1, y1) of the box seen from above."""
        c = self.corners()
        return float(c[:, 0].min()), float(c[:, 1].min()), float(c[:, 0].max()), float(c[:, 1].max())


@dataclass
class Camera:
    """A pinhole camera at `position` (world, metres) with camera-to-world rotation `rotation` (3x3)."""

    position: np.ndarray
    rotation: np.ndarray
    intrinsics: Intrinsics

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """World points (..., 3) in camera coordinates (x right, y down, z forward)."""
        return (np.asarray(points) - self.position) @ self.rotation

    def world_rays(self, rays_cam: np.ndarray | None = None) -> np.ndarray:
        """World-frame ray directions (H, W, 3) float32; the z = 1 camera-frame scaling is kept (t is depth)."""
        rays_cam = self.intrinsics.rays() if rays_cam is None else rays_cam
        return rays_cam @ self.rotation.T.astype(np.float32)


@dataclass
class CastResult:
    """Per-pixel result of casting every pixel's ray into a room.

    depth: (H, W) float32 metres along the optical axis. part: (H, W) int32 index of the box hit, -1 for the room
    shell. face: (H, W) int8 face id (FACE_*) of the box, or of the room's shell (FACE_NEG_Z = floor, FACE_POS_Z =
    ceiling, the others walls). uv: (H, W, 2) float32 surface coordinates in metres (box faces: relative to the
    face centre; the room: world coordinates along the surface), for texturing. normal_world, normal_cam: (H, W, 3)
    float32 unit normals facing the camera, in world and camera frames. points: (H, W, 3) float32 world hit points.
    """

    depth: np.ndarray
    part: np.ndarray
    face: np.ndarray
    uv: np.ndarray
    normal_world: np.ndarray
    normal_cam: np.ndarray
    points: np.ndarray


def box_pixel_rect(box: Box, camera: Camera) -> tuple[int, int, int, int] | None:
    """Pixel rectangle (v0, v1, u0, u1), half-open, that can contain the box's projection; None if off-screen.

    A box that reaches behind the camera's image plane cannot be bounded by projecting its corners, so it gets
    the whole image (rare: the camera keeps clear of furniture).
    """
    intr = camera.intrinsics
    pc = camera.to_camera(box.corners())
    z = pc[:, 2]
    if np.all(z <= 1e-6):
        return None
    if np.any(z <= 0.05):
        return 0, intr.height, 0, intr.width
    u = intr.fx * pc[:, 0] / z + intr.cx
    v = intr.fy * pc[:, 1] / z + intr.cy
    u0, u1 = max(int(math.floor(u.min())) - 1, 0), min(int(math.ceil(u.max())) + 2, intr.width)
    v0, v1 = max(int(math.floor(v.min())) - 1, 0), min(int(math.ceil(v.max())) + 2, intr.height)
    if u0 >= u1 or v0 >= v1:
        return None
    return v0, v1, u0, u1


def _slab(origin: np.ndarray, dirs: np.ndarray, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit parameters of rays origin + t*dirs through the box |x| <= half (local frame), vectorised.

    dirs: (..., 3); returns (t_near, t_far) of shape (...). A ray parallel to a slab gets +-inf there (IEEE), and
    the rare 0/0 becomes NaN, which fails every later comparison and so counts as a miss.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.float32(1.0) / dirs
        ta = (-half - origin).astype(np.float32) * inv
        tb = (half - origin).astype(np.float32) * inv
    return np.minimum(ta, tb).max(axis=-1), np.maximum(ta, tb).min(axis=-1)


def cast_room(room_size: np.ndarray, boxes: list[Box], camera: Camera,
              rays_cam: np.ndarray | None = None) -> CastResult:
    """Cast every pixel of `camera` into the room of size `room_size` (Lx, Ly, Lz) containing `boxes`.

    The nearest hit wins, so occlusion is exact. The camera must be inside the room and outside every box.
    """
    intr = camera.intrinsics
    h, w = intr.height, intr.width
    rays_world = camera.world_rays(rays_cam)
    cam = camera.position.astype(np.float64)
    room_size = np.asarray(room_size, dtype=np.float64)
    if np.any(cam <= 0) or np.any(cam >= room_size):
        raise ValueError(f"camera at {cam} is outside the room {room_size}")

    # Room shell: the camera is inside, so every ray leaves through exactly one face at its slab exit.
    half_room = room_size / 2.0
    _, t_exit = _slab(cam - half_room, rays_world, half_room)
    depth = t_exit.astype(np.float32)
    part = np.full((h, w), -1, dtype=np.int32)

    rects: list[tuple[int, int, int, int] | None] = []
    for k, box in enumerate(boxes):
        rect = box_pixel_rect(box, camera)
        rects.append(rect)
        if rect is None:
            continue
        v0, v1, u0, u1 = rect
        local_dirs = rays_world[v0:v1, u0:u1] @ box.rotation.astype(np.float32)
        origin = box.rotation.T @ (cam - box.center)
        t_near, t_far = _slab(origin, local_dirs, box.half)
        cur = depth[v0:v1, u0:u1]
        hit = (t_near <= t_far) & (t_near > _T_EPS) & (t_near < cur)
        cur[hit] = t_near[hit]  # `cur` is a view: writes through to `depth`
        part[v0:v1, u0:u1][hit] = k

    face = np.empty((h, w), dtype=np.int8)
    uv = np.empty((h, w, 2), dtype=np.float32)
    normal_world = np.empty((h, w, 3), dtype=np.float32)
    points = cam.astype(np.float32) + depth[..., None] * rays_world

    # Room shell pixels: the exit axis is where the slab exit was reached first.
    shell = part < 0
    if shell.any():
        p = points[shell]
        d = rays_world[shell]
        with np.errstate(divide="ignore", invalid="ignore"):
            t_axes = np.where(d > 0, (room_size - cam) / d, -cam / d)  # exit parameter per axis
        t_axes = np.nan_to_num(t_axes, nan=np.inf, posinf=np.inf, neginf=np.inf)
        axis = np.argmin(t_axes, axis=1)
        positive = d[np.arange(len(d)), axis] > 0  # leaving through the far (+) side of that axis
        face_ids = (axis * 2 + (~positive)).astype(np.int8)
        face[shell] = face_ids
        n = np.zeros_like(p)
        n[np.arange(len(p)), axis] = np.where(positive, -1.0, 1.0)  # the shell's normals point into the room
        normal_world[shell] = n
        # Surface coordinates: floor/ceiling use (x, y); walls use (coordinate along the wall, height).
        uv_shell = np.where((axis == 2)[:, None], p[:, :2],
                            np.where((axis == 0)[:, None], p[:, [1, 2]], p[:, [0, 2]]))
        uv[shell] = uv_shell

    # Box pixels: find the face from the local hit point (the coordinate closest to its slab bound, relative).
    for k, box in enumerate(boxes):
        rect = rects[k]
        if rect is None:
            continue
        v0, v1, u0, u1 = rect
        mine = part[v0:v1, u0:u1] == k
        if not mine.any():
            continue
        local = (points[v0:v1, u0:u1][mine] - box.center.astype(np.float32)) @ box.rotation.astype(np.float32)
        rel = np.abs(local) / box.half.astype(np.float32)
        axis = np.argmax(rel, axis=1)
        negative = local[np.arange(len(local)), axis] < 0
        face[v0:v1, u0:u1][mine] = (axis * 2 + negative).astype(np.int8)
        n_local = np.zeros_like(local)
        n_local[np.arange(len(local)), axis] = np.where(negative, -1.0, 1.0)
        normal_world[v0:v1, u0:u1][mine] = n_local @ box.rotation.T.astype(np.float32)
        # Face coordinates: z faces use (x, y), y faces (x, z), x faces (y, z), all relative to the box centre.
        uv[v0:v1, u0:u1][mine] = np.where((axis == 2)[:, None], local[:, :2],
                                          np.where((axis == 1)[:, None], local[:, [0, 2]], local[:, [1, 2]]))

    normal_cam = normal_world @ camera.rotation.astype(np.float32)
    return CastResult(depth=depth, part=part, face=face, uv=uv, normal_world=normal_world,
                      normal_cam=normal_cam, points=points)
