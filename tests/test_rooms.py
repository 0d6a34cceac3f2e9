"""Tests of the synthetic rooms (rock_dist.synthetic: rooms, scenes, geometry): geometry, annotations, raw-depth
holes, determinism and the official-layout files read back through rock_dist.shardbuild.nyuv2. Small images keep each
test to a second or so."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import scipy.io

from rock_dist.data.constants import CLASS_NAMES, NYU_LABEL_IDS, SCENE_TYPES, class_id
from rock_dist.errors import ConfigError
from rock_dist.shardbuild.nyuv2 import NYUv2Official, class_lookup_table, derive_boxes
from rock_dist.synthetic.geometry import (FACE_NEG_X, FACE_NEG_Z, FACE_POS_Z, Box, Camera, Intrinsics,
                                          camera_rotation, cast_room)
from rock_dist.synthetic.official_layout import load_ground_truth
from rock_dist.synthetic.rooms import default_min_object_pixels, main, make_rooms_dataset, render_view, room_names
from rock_dist.synthetic.scenes import (CLASS_SIGNATURES, NYU_FLOOR, NYU_WALL, ROOM_SCENE_TYPES, SCENE_CLASSES,
                                        build_room, sample_camera)

H, W = 60, 80


def _camera(pos: tuple[float, float, float], yaw: float, pitch: float, h: int = H, w: int = W) -> Camera:
    return Camera(position=np.array(pos, dtype=np.float64), rotation=camera_rotation(yaw, pitch),
                  intrinsics=Intrinsics.nyu(h, w))


def _views(scene_type: str, seed: int, count: int = 2, h: int = H, w: int = W):
    rng = np.random.default_rng(seed)
    room = build_room(scene_type, rng)
    intr = Intrinsics.nyu(h, w)
    return room, [(cam, render_view(room, cam, rng)) for cam in (sample_camera(room, rng, intr) for _ in range(count))]


# ------------------------------------------------------------------------------------------------------ geometry
def test_intrinsics_are_nyu_and_scale_with_the_image() -> None:
    full = Intrinsics.nyu()
    assert (full.fx, full.fy) == pytest.approx((518.8579, 519.4696))
    assert (full.cx, full.cy) == pytest.approx((325.5824, 253.7362))
    half = Intrinsics.nyu(240, 320)
    assert half.fx == pytest.approx(full.fx / 2) and half.fy == pytest.approx(full.fy / 2)
    # The principal point stays at the same place in the picture (relative to its size).
    assert (half.cx + 0.5) / 320 == pytest.approx((full.cx + 0.5) / 640)
    rays = half.rays()
    assert rays.shape == (240, 320, 3) and np.all(rays[..., 2] == 1.0)


def test_depth_matches_ray_geometry_in_an_empty_room() -> None:
    size = np.array([5.0, 4.0, 2.6])
    cam_h, pitch = 1.4, 0.3
    camera = _camera((2.5, 1.0, cam_h), yaw=math.pi / 2 + 0.2, pitch=pitch)
    cast = cast_room(size, [], camera)
    rays_world = camera.world_rays()
    floor = cast.face == FACE_NEG_Z
    assert floor.any() and (cast.face == FACE_POS_Z).sum() < floor.sum()
    # A floor pixel's depth is the camera height over the ray's downward component (rays have camera z = 1).
    expected = cam_h / -rays_world[..., 2]
    np.testing.assert_allclose(cast.depth[floor], expected[floor], rtol=1e-4)
    # Every hit point lies on the room's shell, and its camera-frame z is the depth.
    pts = cast.points.reshape(-1, 3)
    on_shell = np.min(np.abs(np.concatenate([pts, size - pts], axis=1)), axis=1)
    assert on_shell.max() < 1e-3
    z_cam = camera.to_camera(cast.points.astype(np.float64))[..., 2]
    np.testing.assert_allclose(z_cam, cast.depth, rtol=1e-4, atol=1e-4)
    # Looking down at the floor: the bottom image row is nearer than the horizon.
    assert cast.depth[-1, W // 2] < cast.depth[H // 3, W // 2]


def test_nearest_box_wins_and_box_faces_have_exact_depth() -> None:
    size = np.array([6.0, 6.0, 3.0])
    camera = _camera((1.0, 3.0, 1.0), yaw=0.0, pitch=0.0)  # looking along +x at the x = 6 wall
    near = Box(center=np.array([3.0, 3.0, 1.0]), half=np.array([0.25, 0.3, 0.3]))
    far = Box(center=np.array([4.5, 3.0, 1.0]), half=np.array([0.5, 1.0, 0.8]))  # larger, partly hidden
    cast = cast_room(size, [far, near], camera)
    cy, cx = H // 2, W // 2
    assert cast.part[cy, cx] == 1  # the near box hides the far one at the image centre
    assert cast.depth[cy, cx] == pytest.approx(3.0 - 0.25 - 1.0, abs=1e-4)
    assert cast.face[cy, cx] == FACE_NEG_X
    np.testing.assert_allclose(cast.normal_cam[cy, cx], [0.0, 0.0, -1.0], atol=1e-5)
    visible_far = cast.part == 0
    assert visible_far.any()
    np.testing.assert_allclose(cast.depth[visible_far], 4.0 - 1.0, atol=1e-4)  # its front face at x = 4.0
    # The far wall (x = 6) seen past the boxes is 5 m ahead along the optical axis, at every pixel.
    wall = (cast.part == -1) & (np.abs(cast.points[..., 0] - 6.0) < 1e-3)
    assert wall.sum() > W
    np.testing.assert_allclose(cast.depth[wall], 5.0, atol=1e-3)


def test_normals_are_unit_and_face_the_camera() -> None:
    for scene_type in ("office", "bedroom"):
        _, views = _views(scene_type, seed=3)
        for cam, view in views:
            n = view.normals
            np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-5)
            rays = cam.intrinsics.rays()
            assert np.all(np.sum(n * rays, axis=-1) < 1e-6)  # facing the camera: against the viewing ray
            assert view.normal_mask.dtype == bool and 0.3 < view.normal_mask.mean() < 1.0


# --------------------------------------------------------------------------------------------------- annotations
def test_visible_objects_get_one_box_around_their_pixels() -> None:
    table = class_lookup_table(NYU_LABEL_IDS)
    min_px = default_min_object_pixels(H, W)
    checked = 0
    for seed, scene_type in enumerate(("office", "dining_room", "living_room", "bedroom")):
        room, views = _views(scene_type, seed=10 + seed)
        boxes_world, owner = room.boxes()
        owner_of = np.asarray(owner + [-1])  # index -1 (the room shell) maps to -1
        for cam, view in views:
            # The reader's derivation from labels/instances gives exactly the renderer's boxes.
            boxes, labels = derive_boxes(view.labels, view.instances, table)
            np.testing.assert_array_equal(boxes, view.boxes)
            np.testing.assert_array_equal(labels, view.box_labels)
            cast = cast_room(room.size, boxes_world, cam)
            obj_of_pixel = owner_of[cast.part]
            counts = np.bincount(obj_of_pixel[obj_of_pixel >= 0], minlength=len(room.objects))
            # Exactly the detection-class objects visible enough have a box, one each.
            expected = {o for o, obj in enumerate(room.objects) if obj.is_class and counts[o] >= min_px}
            assert len(view.objects) == len(set(view.objects)) and set(view.objects) == expected
            for box, label, o in zip(view.boxes, view.box_labels, view.objects):
                obj = room.objects[o]
                assert class_id(obj.name) == label
                hits = obj_of_pixel == o
                hy, hx = np.nonzero(hits)
                assert (hx.min(), hy.min(), hx.max(), hy.max()) == tuple(box)
                # Its labelled pixels are its own, and its 3D hit points lie in its parts: labels match geometry.
                assert np.all(view.labels[hits] == obj.nyu_id) and len(np.unique(view.instances[hits])) == 1
                pts = cast.points[hits].astype(np.float64)
                in_part = np.zeros(len(pts), bool)
                for k in (k for k, ow in enumerate(owner) if ow == o):
                    b = boxes_world[k]
                    local = (pts - b.center) @ b.rotation
                    in_part |= np.all(np.abs(local) <= b.half + 1e-3, axis=1)
                assert in_part.all()
                checked += 1
    assert checked >= 5


def test_scene_type_decides_the_classes_present() -> None:
    signature = {"bedroom": "bed", "bathroom": "toilet", "living_room": "sofa", "dining_room": "table",
                 "kitchen": "counter"}
    seen: dict[str, set[str]] = {t: set() for t in ROOM_SCENE_TYPES}
    for scene_type in ROOM_SCENE_TYPES:
        assert scene_type in SCENE_TYPES
        with_signature = 0
        for seed in range(4):
            room, views = _views(scene_type, seed=100 + seed, count=1)
            placed = {o.name for o in room.objects if o.is_class}
            assert placed <= SCENE_CLASSES[scene_type]
            with_signature += signature.get(scene_type, "") in placed
            for _, view in views:
                names = {CLASS_NAMES[c - 1] for c in view.box_labels}
                assert names <= SCENE_CLASSES[scene_type]
                seen[scene_type] |= names
        # The piece of furniture that makes the room what it is (a bed in a bedroom) is (almost) always there.
        assert scene_type not in signature or with_signature >= 3
    # The scene types differ in what they show: no two share the same set of classes.
    assert "bathtub" not in SCENE_CLASSES["office"] and "monitor" not in SCENE_CLASSES["bathroom"]
    assert seen["bathroom"].isdisjoint({"bed", "sofa", "desk", "monitor"})


def test_background_gets_wall_and_floor_labels() -> None:
    _, views = _views("bedroom", seed=7, count=1)
    labels = views[0][1].labels
    assert (labels == NYU_WALL).any() and (labels == NYU_FLOOR).any()
    names = room_names()
    assert names[NYU_WALL - 1] == "wall" and names[NYU_FLOOR - 1] == "floor"
    assert all(names[nyu - 1] == name for name, nyu in NYU_LABEL_IDS.items())


def test_raw_depth_has_kinect_holes_where_depths_has_none() -> None:
    _, views = _views("office", seed=5, count=2, h=96, w=128)
    for _cam, view in views:
        assert np.all(view.depth > 0) and np.all(np.isfinite(view.depth))
        holes = view.raw_depth == 0
        assert 0.005 < holes.mean() < 0.6
        valid = ~holes
        # Where the Kinect measured, it is the true depth up to quantisation noise growing with depth squared.
        err = np.abs(view.raw_depth[valid] - view.depth[valid])
        assert np.all(err < 0.01 + 0.01 * view.depth[valid] ** 2)
        # Depth discontinuities lose their reading (shadow of the projector, mixed pixels).
        jump = np.abs(np.diff(view.depth, axis=1)) > 0.05 + 0.03 * view.depth[:, 1:]
        if jump.any():
            assert holes[:, 1:][jump].mean() > 0.5 or holes[:, :-1][jump].mean() > 0.5
        assert not view.normal_mask[holes].any()


# ----------------------------------------------------------------------------------------------------- datasets
def _read_arrays(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as h5:
        return {k: h5[k][()] for k in ("images", "depths", "rawDepths", "labels", "instances")}


def test_dataset_is_deterministic_under_the_seed_whatever_the_number_of_workers(tmp_path) -> None:
    a = make_rooms_dataset(tmp_path / "a", 6, seed=11, height=32, width=40)
    b = make_rooms_dataset(tmp_path / "b", 6, seed=11, height=32, width=40, workers=2)  # two processes
    c = make_rooms_dataset(tmp_path / "c", 6, seed=12, height=32, width=40)
    arr_a, arr_b, arr_c = (_read_arrays(p.dataset_path) for p in (a, b, c))
    for key in arr_a:
        np.testing.assert_array_equal(arr_a[key], arr_b[key])
    assert not np.array_equal(arr_a["images"], arr_c["images"])
    split_a, split_b = scipy.io.loadmat(a.splits_path), scipy.io.loadmat(b.splits_path)  # headers hold a time
    for key in ("trainNdxs", "testNdxs"):
        np.testing.assert_array_equal(split_a[key], split_b[key])
    assert load_ground_truth(a.ground_truth_path) == load_ground_truth(b.ground_truth_path)
    for k in range(6):
        name = f"{k:04d}.png"
        assert (a.normals_path / "normals" / name).read_bytes() == (b.normals_path / "normals" / name).read_bytes()


def test_class_tint_recolours_objects_without_moving_anything(tmp_path) -> None:
    natural = make_rooms_dataset(tmp_path / "natural", 6, seed=3, height=48, width=64)
    tinted = make_rooms_dataset(tmp_path / "tinted", 6, seed=3, height=48, width=64, class_tint=1.0)
    a, b = _read_arrays(natural.dataset_path), _read_arrays(tinted.dataset_path)
    for key in ("depths", "labels", "instances"):  # same rooms, same views: the tint draws nothing from the RNG
        np.testing.assert_array_equal(a[key], b[key])
    assert load_ground_truth(natural.ground_truth_path) == load_ground_truth(tinted.ground_truth_path)
    class_of_pixel = class_lookup_table(NYU_LABEL_IDS)[a["labels"]]
    on_objects = class_of_pixel > 0  # h5py layout: N x W x H, images N x 3 x W x H
    assert on_objects.any()
    rgb_a, rgb_b = a["images"].astype(np.int16), b["images"].astype(np.int16)
    changed = np.abs(rgb_a - rgb_b).max(axis=1) > 8
    assert changed[on_objects].mean() > 0.8  # objects take their class colour ...
    assert changed[a["labels"] == NYU_WALL].mean() < 0.05  # ... walls keep theirs (lighting aside)
    # Fully tinted, each class's pixels lean toward its own signature hue: the mean colour of a class's pixels is
    # closer to its signature than to any other class's.
    for cls in np.unique(class_of_pixel[on_objects]):
        mask = class_of_pixel == cls
        mean = rgb_b.transpose(0, 2, 3, 1)[mask].mean(axis=0) / 255.0
        name = CLASS_NAMES[int(cls) - 1]
        signatures = np.array(list(CLASS_SIGNATURES.values()))
        cosine = signatures @ mean / (np.linalg.norm(signatures, axis=1) * np.linalg.norm(mean))
        assert list(CLASS_SIGNATURES)[int(np.argmax(cosine))] == name or cosine.max() - cosine[
            list(CLASS_SIGNATURES).index(name)] < 0.02, name


def test_class_signatures_are_distinct() -> None:
    colours = np.array([CLASS_SIGNATURES[name] for name in CLASS_NAMES])
    assert colours.shape == (19, 3)
    distances = np.linalg.norm(colours[:, None] - colours[None], axis=2) + np.eye(19) * 9
    assert distances.min() > 0.1


def test_train_fraction_sets_the_split(tmp_path) -> None:
    small = make_rooms_dataset(tmp_path / "a", 30, seed=1, height=24, width=32, train_fraction=0.3)
    large = make_rooms_dataset(tmp_path / "b", 30, seed=1, height=24, width=32, train_fraction=0.8)
    n_small = scipy.io.loadmat(small.splits_path)["trainNdxs"].size
    n_large = scipy.io.loadmat(large.splits_path)["trainNdxs"].size
    assert n_small == 9 and n_large == 24  # 10 scenes of 3 views: 3 and 8 training scenes
    with pytest.raises(ConfigError, match="train_fraction"):
        make_rooms_dataset(tmp_path / "c", 4, seed=1, height=24, width=32, train_fraction=1.0)
    with pytest.raises(ConfigError, match="class_tint"):
        make_rooms_dataset(tmp_path / "d", 4, seed=1, height=24, width=32, class_tint=1.5)


def test_min_object_area_leaves_small_objects_without_a_box(tmp_path) -> None:
    h, w, area = 48, 64, 0.04
    paths = make_rooms_dataset(tmp_path / "a", 9, seed=2, height=h, width=w, min_object_area=area)
    default = load_ground_truth(make_rooms_dataset(tmp_path / "b", 9, seed=2, height=h, width=w).ground_truth_path)
    arrays = _read_arrays(paths.dataset_path)  # h5py layout: N x W x H
    truth = load_ground_truth(paths.ground_truth_path)
    kept = 0
    for k, entry in truth.items():
        labels, instances = arrays["labels"][k].T, arrays["instances"][k].T
        for (x0, y0, x1, y1), cls in zip(entry["boxes"], entry["labels"]):
            # The object's own pixels inside its box reach the threshold (a box alone could be a sparse sliver).
            inside = (slice(y0, y1 + 1), slice(x0, x1 + 1))
            nyu = NYU_LABEL_IDS[CLASS_NAMES[cls - 1]]
            counts = np.bincount(instances[inside][labels[inside] == nyu], minlength=2)[1:]
            assert counts.max() >= area * h * w
            kept += 1
    small = [(x1 - x0 + 1) * (y1 - y0 + 1) < area * h * w for e in default.values() for x0, y0, x1, y1 in e["boxes"]]
    assert kept > 0 and any(small)  # the default rooms have such small boxes; with the option none is left
    with pytest.raises(ConfigError, match="min_object_area"):
        make_rooms_dataset(tmp_path / "c", 4, seed=1, height=24, width=32, min_object_area=1.0)


def test_camera_distance_brings_the_camera_near_the_object_it_films() -> None:
    intr = Intrinsics.nyu(H, W)

    def nearest(max_distance: float) -> list[float]:
        rng = np.random.default_rng(5)
        gaps = []
        for scene_type in ROOM_SCENE_TYPES:
            room = build_room(scene_type, rng)
            centres = np.array([o.position[:2] for o in room.objects if o.is_class])
            for _ in range(6):
                cam = sample_camera(room, rng, intr, max_distance=max_distance)
                gaps.append(float(np.min(np.linalg.norm(centres - cam.position[:2], axis=1))))
        return gaps

    near, anywhere = np.array(nearest(1.8)), np.array(nearest(0.0))
    # Within reach of a piece of furniture whenever a free spot exists there (else the room's camera zone).
    assert np.mean(near <= 1.8 + 1e-9) > 0.8
    assert np.median(near) < np.median(anywhere)
    with pytest.raises(ConfigError, match="camera_distance"):
        make_rooms_dataset("unused", 4, seed=1, height=24, width=32, camera_distance=-1.0)


def test_max_object_area_redraws_close_ups_that_one_object_fills(tmp_path) -> None:
    h, w, limit = 48, 64, 0.4

    def filled(**options) -> list[float]:
        out = tmp_path / f"rooms{len(options)}"
        truth = load_ground_truth(make_rooms_dataset(out, 24, seed=3, height=h, width=w, camera_distance=1.0,
                                                     **options).ground_truth_path)
        return [max(((x1 - x0 + 1) * (y1 - y0 + 1) / (h * w) for x0, y0, x1, y1 in e["boxes"]), default=0.0)
                for e in truth.values()]

    close, capped = np.array(filled()), np.array(filled(max_object_area=limit))
    assert np.mean(close > limit) >= 0.2  # filmed from within 1 m, many views are close-ups of one object
    # A view is kept over the limit only when 8 camera draws found no other with a box (never here).
    assert np.mean(capped > limit) < 0.5 * np.mean(close > limit)
    assert np.mean(capped > 0) >= 0.9  # the redrawn views still show objects
    with pytest.raises(ConfigError, match="max_object_area"):
        make_rooms_dataset(tmp_path / "bad", 4, seed=1, height=24, width=32, min_object_area=0.2, max_object_area=0.1)


def test_official_layout_reads_back(tmp_path) -> None:
    n = 21
    paths = make_rooms_dataset(tmp_path, n, seed=4, height=48, width=64)
    truth = load_ground_truth(paths.ground_truth_path)
    assert paths.val_split_path is not None
    rays = Intrinsics.nyu(48, 64).rays()
    unit_rays = rays / np.linalg.norm(rays, axis=-1, keepdims=True)
    with NYUv2Official(paths.dataset_path, paths.splits_path, paths.normals_path, paths.val_split_path) as ds:
        assert len(ds) == n and (ds.height, ds.width) == (48, 64)
        splits = {k: set(v) for k, v in ds.splits.items()}
        assert set(splits) == {"train", "val", "test"}
        assert set.union(*splits.values()) == set(range(n)) and sum(map(len, splits.values())) == n
        # Split by scene instance: no scene has images on both sides.
        scene_sets = {k: {ds.scene_names[i] for i in v} for k, v in splits.items()}
        assert scene_sets["train"].isdisjoint(scene_sets["test"]) and scene_sets["val"].isdisjoint(scene_sets["test"])
        assert len(set(ds.scene_names)) == 7  # 21 images, 3 per scene instance
        num_boxes = 0
        for i in range(n):
            sample = ds.read(i)
            record = truth[i]
            assert sample.boxes.tolist() == record["boxes"] and sample.labels.tolist() == record["labels"]
            assert sample.scene_type == record["scene_type"] and sample.scene_id == record["scene_id"]
            assert sample.scene_name == record["scene_name"] and sample.scene_name.startswith(sample.scene_type + "_")
            assert sample.scene_name[-4:].isdigit()
            assert i in splits[record["split"]]
            assert sample.depth is not None and 0.3 < sample.depth.min() and sample.depth.max() < 11.0
            assert sample.normals is not None and sample.normals_mask is not None
            assert sample.normals_mask.any()
            # Decoded from the 8-bit PNGs, the normals still face the camera (up to quantisation).
            facing = np.sum(sample.normals * unit_rays, axis=-1)[sample.normals_mask]
            assert facing.max() < 0.02
            num_boxes += len(sample.boxes)
        assert num_boxes >= n  # on average at least one object per image: detection has signal
    with h5py.File(paths.dataset_path, "r") as h5:
        raw = h5["rawDepths"][()]
        depths = h5["depths"][()]
    assert (raw == 0).any() and (depths > 0).all()


def test_cli_writes_the_files_and_rejects_bad_input(tmp_path, capsys) -> None:
    out = tmp_path / "rooms"
    assert main(["--out", str(out), "--num_images", "4", "--seed", "2", "--height", "32", "--width", "48",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"dataset_path {out / 'nyu_depth_v2_labeled.mat'}" in printed
    assert (out / "splits.mat").is_file() and (out / "normals_gt" / "masks" / "0003.png").is_file()
    with pytest.raises(ConfigError, match="num_images"):
        main(["--out", str(tmp_path / "x"), "--num_images", "1"])
