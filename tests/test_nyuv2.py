"""The official-file reader and the synthetic writer: layout, per-image derivations, splits, and bad input."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from rock_dist.data.constants import CLASS_NAMES, NYU_LABEL_IDS, NYU_NUM_NAMES, SCENE_TYPES, class_id
from rock_dist.errors import DataError
from rock_dist.shardbuild.nyuv2 import NormalsSource, NYUv2Official, class_lookup_table, derive_boxes, read_splits
from rock_dist.synthetic.official_layout import make_random_dataset, official_like_names, write_official_layout


def _reader(files, **override) -> NYUv2Official:
    p = files.paths
    args = {"dataset_path": p.dataset_path, "splits_path": p.splits_path, "normals_path": p.normals_path,
            "val_split_path": p.val_split_path}
    args.update(override)
    return NYUv2Official(**args)


def _box_set(boxes, labels) -> list[tuple[int, ...]]:
    return sorted(tuple(int(v) for v in b) + (int(c),) for b, c in zip(boxes, labels))


def _copy(files, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(files.paths.dataset_path.parent, root)
    return root


# ------------------------------------------------------------------------------------------------ the layout
def test_synthetic_files_have_the_official_layout(nyu_files) -> None:
    p, n, h, w = nyu_files.paths, nyu_files.n, nyu_files.height, nyu_files.width
    head = p.dataset_path.read_bytes()[:128]
    assert head.startswith(b"MATLAB 7.3 MAT-file") and head[124:128] == b"\x00\x02IM"
    with pytest.raises(NotImplementedError):  # like the real file: scipy refuses v7.3
        scipy.io.loadmat(p.dataset_path)
    with h5py.File(p.dataset_path, "r") as f:
        assert f.userblock_size == 512
        assert f["images"].shape == (n, 3, w, h) and f["images"].dtype == np.uint8
        assert f["depths"].shape == f["labels"].shape == f["instances"].shape == (n, w, h)
        assert f["labels"].dtype == np.uint16 and f["instances"].dtype == np.uint8
        assert f["names"].shape == (1, NYU_NUM_NAMES) and f["sceneTypes"].shape == (1, n)
        chair = f[f["names"][0, NYU_LABEL_IDS["chair"] - 1]]
        assert chair.shape == (5, 1) and chair.dtype == np.uint16
        assert "".join(map(chr, chair[()].ravel())) == "chair"
    splits = scipy.io.loadmat(p.splits_path)
    assert splits["trainNdxs"].dtype == np.uint16 and splits["trainNdxs"].shape[1] == 1
    one_based = np.concatenate([splits["trainNdxs"].ravel(), splits["testNdxs"].ravel()])
    assert sorted(one_based.tolist()) == list(range(1, n + 1))
    names = sorted(q.name for q in (p.normals_path / "normals").iterdir())
    assert names == [f"{i:04d}.png" for i in range(n)]
    assert sorted(q.name for q in (p.normals_path / "masks").iterdir()) == names
    assert p.val_split_path is not None and p.val_split_path.read_text().strip()


def test_reader_transposes_and_decodes_exactly(tmp_path: Path) -> None:
    """Known arrays of a non-square size come back unchanged: a reshape instead of a transpose would scramble them."""
    rng = np.random.default_rng(3)
    n, h, w = 3, 5, 7
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    depths = rng.uniform(0.7, 10, (n, h, w)).astype(np.float32)
    normals = rng.normal(size=(n, h, w, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    masks = rng.random((n, h, w)) > 0.3
    labels = np.zeros((n, h, w), np.uint16)
    instances = np.zeros((n, h, w), np.uint8)
    labels[1, 1:3, 2:6] = NYU_LABEL_IDS["sofa"]
    instances[1, 1:3, 2:6] = 1
    paths = write_official_layout(tmp_path, images=images, depths=depths, raw_depths=depths, labels=labels,
                                  instances=instances, scene_types=["kitchen", "", "study_room"],
                                  scenes=["kitchen_0001", "x_0001", "study_room_0002"], normals=normals,
                                  normal_masks=masks, train_idx=[0, 1], test_idx=[2], val_scenes=None)
    with NYUv2Official(paths.dataset_path, paths.splits_path, paths.normals_path) as reader:
        assert (reader.num_images, reader.height, reader.width) == (n, h, w)
        for i in range(n):
            s = reader.read(i)
            np.testing.assert_array_equal(s.rgb, images[i])
            np.testing.assert_array_equal(s.depth, depths[i])
            np.testing.assert_array_equal(s.normals_mask, masks[i])
            assert np.abs(s.normals - normals[i]).max() < 0.02  # 8-bit quantisation only
            np.testing.assert_allclose(np.linalg.norm(s.normals, axis=-1), 1.0, atol=1e-5)
        assert _box_set(reader.read(1).boxes, reader.read(1).labels) == [(2, 1, 5, 2, class_id("sofa"))]
        assert reader.read(0).scene_id == SCENE_TYPES.index("kitchen")
        assert reader.read(1).scene_id is None and reader.read(1).scene_type is None
        assert reader.read(2).scene_id == 26
        assert reader.splits == {"train": [0, 1], "test": [2]}


# ------------------------------------------------------------------------------------------------ annotations
def test_boxes_classes_and_scenes_match_ground_truth(nyu_files) -> None:
    with _reader(nyu_files) as reader:
        assert reader.nyu_label_ids == NYU_LABEL_IDS
        samples = list(reader.iter_samples(range(nyu_files.n), block=5))
    assert [s.index for s in samples] == list(range(nyu_files.n))
    total = 0
    for s in samples:
        truth = nyu_files.ground_truth[s.index]
        assert _box_set(s.boxes, s.labels) == _box_set(truth["boxes"], truth["labels"]), s.index
        assert s.scene_id == truth["scene_id"] and s.scene_name == truth["scene_name"]
        assert s.boxes.dtype == np.int64 and s.labels.dtype == np.int64
        total += len(s.labels)
    assert total > nyu_files.n  # several objects per image on average: the comparison is not vacuous


def test_class_id_i_is_kept_in_image_i(nyu_files) -> None:
    """The reference filtered `!= i` (the image index) instead of `!= 0`; every image 1..19 here has class id i."""
    with _reader(nyu_files) as reader:
        for i in range(1, min(nyu_files.n, len(CLASS_NAMES) + 1)):
            assert i in reader.read_annotations(i)[1].tolist(), i


def test_derive_boxes_rules() -> None:
    table = class_lookup_table(NYU_LABEL_IDS)
    labels = np.zeros((10, 12), np.uint16)
    inst = np.zeros((10, 12), np.uint8)
    chair, table_id = NYU_LABEL_IDS["chair"], NYU_LABEL_IDS["table"]
    labels[0:2, 0:2], inst[0:2, 0:2] = chair, 1  # chair 1, part one
    labels[7:9, 9:11], inst[7:9, 9:11] = chair, 1  # chair 1, a disjoint part: one box over both
    labels[4, 4], inst[4, 4] = chair, 3  # instance 3 with no instance 2: a gap must not break anything
    labels[5:7, 0:3], inst[5:7, 0:3] = table_id, 1  # same instance number, other class: another object
    labels[3, 6:9], inst[3, 6:9] = table_id, 0  # instance 0: not an object
    labels[9, :], inst[9, :] = 21, 1  # a label outside the 19 classes
    boxes, classes = derive_boxes(labels, inst, table)
    assert _box_set(boxes, classes) == sorted([(0, 0, 10, 8, class_id("chair")), (4, 4, 4, 4, class_id("chair")),
                                               (0, 5, 2, 6, class_id("table"))])
    empty_boxes, empty_labels = derive_boxes(np.zeros((3, 3), np.uint16), np.zeros((3, 3), np.uint8), table)
    assert empty_boxes.shape == (0, 4) and empty_labels.shape == (0,)


# ----------------------------------------------------------------------------------------------------- splits
def test_splits_and_val_split_match_ground_truth(nyu_files) -> None:
    with _reader(nyu_files) as reader:
        splits = reader.splits
    assert list(splits) == ["train", "val", "test"]
    for split, indices in splits.items():
        expected = sorted(i for i, t in nyu_files.ground_truth.items() if t["split"] == split)
        assert indices == expected and indices, split
    official = read_splits(nyu_files.paths.splits_path, nyu_files.n)
    assert sorted(splits["train"] + splits["val"]) == official["train"].tolist()  # val comes out of train only
    assert splits["test"] == official["test"].tolist()
    val_scenes = set(nyu_files.paths.val_split_path.read_text().split())
    with _reader(nyu_files) as reader:
        assert {reader.scene_names[i] for i in splits["val"]} == val_scenes
    with _reader(nyu_files, val_split_path=None) as reader:
        assert set(reader.splits) == {"train", "test"}


# ---------------------------------------------------------------------------------------------------- normals
def test_normals_tgz_is_read_in_place_and_equals_the_folder(nyu_files, tmp_path: Path) -> None:
    paths = make_random_dataset(tmp_path / "tgz", nyu_files.n, 0, nyu_files.height, nyu_files.width,
                                normals_as_tgz=True)
    assert paths.normals_path.name == "normals_gt.tgz"
    before = sorted(p.name for p in (tmp_path / "tgz").iterdir())
    order = [7, 0, 23, 3, 3, 12]  # out of archive order, and a repeat
    with NYUv2Official(paths.dataset_path, paths.splits_path, paths.normals_path) as from_tgz, \
            _reader(nyu_files) as from_folder:
        assert from_tgz.normals.kind == "archive"
        for a, b in zip(from_tgz.iter_samples(order, block=4), from_folder.iter_samples(order)):
            np.testing.assert_array_equal(a.normals, b.normals)
            np.testing.assert_array_equal(a.normals_mask, b.normals_mask)
    assert sorted(p.name for p in (tmp_path / "tgz").iterdir()) == before  # nothing extracted


def test_normals_path_may_be_the_parent_of_normals_gt(nyu_files) -> None:
    direct = NormalsSource(nyu_files.paths.normals_path, nyu_files.n)
    parent = NormalsSource(nyu_files.paths.normals_path.parent, nyu_files.n)
    assert parent.root == direct.root == nyu_files.paths.normals_path
    assert parent.read([5])[5].normals_png == (nyu_files.paths.normals_path / "normals" / "0005.png").read_bytes()


def _read_in_child(reader: NYUv2Official, conn) -> None:
    conn.send(reader.read(4).rgb.sum())


def test_reader_reopens_its_handles_in_another_process(nyu_files) -> None:
    with _reader(nyu_files) as reader:
        expected = reader.read(4).rgb.sum()  # the parent's HDF5 handle is open now
        clone = pickle.loads(pickle.dumps(reader))
        assert clone._h5 is None and clone.read(4).rgb.sum() == expected
        # A forked child must not use the parent's HDF5 handle; the reader opens its own there.
        parent, child = mp.get_context("fork").Pipe()
        proc = mp.get_context("fork").Process(target=_read_in_child, args=(reader, child))
        proc.start()
        assert parent.recv() == expected
        proc.join(10)
        assert proc.exitcode == 0
        assert reader.read(4).rgb.sum() == expected


# ------------------------------------------------------------------------------------------------- bad input
def _edit_mat(path: Path, edit) -> None:
    with h5py.File(path, "r+") as f:
        edit(f)


def test_missing_and_non_hdf5_dataset_files(nyu_files, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.mat: dataset file not found"):
        _reader(nyu_files, dataset_path=tmp_path / "nope.mat")
    with pytest.raises(DataError, match=r"splits\.mat: is a MATLAB v5 file, not the v7\.3"):
        _reader(nyu_files, dataset_path=nyu_files.paths.splits_path)
    root = _copy(nyu_files, tmp_path)
    mat = root / "nyu_depth_v2_labeled.mat"
    data = mat.read_bytes()
    mat.write_bytes(data[: len(data) // 3])  # a cut-off download
    with pytest.raises(DataError, match=r"nyu_depth_v2_labeled\.mat: .*(truncated|corrupt|cannot)"):
        r = _reader(nyu_files, dataset_path=mat)
        r.read(nyu_files.n - 1)


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.__delitem__("labels"), r"missing required key\(s\) labels"),
    (lambda f: f.__delitem__("sceneTypes"), r"missing required key\(s\) sceneTypes"),
    (lambda f: (f.__delitem__("depths"), f.create_dataset("depths", data=np.zeros((24, 64, 47), np.float32))),
     r"depths has shape \(24, 64, 47\), expected \(24, 64, 48\)"),
    (lambda f: (f.__delitem__("images"), f.create_dataset("images", data=np.zeros((24, 64, 48), np.uint8))),
     r"images has shape \(24, 64, 48\), expected \(N, 3, W, H\)"),
])
def test_mat_with_missing_key_or_wrong_shape(nyu_files, tmp_path: Path, edit, message: str) -> None:
    mat = _copy(nyu_files, tmp_path) / "nyu_depth_v2_labeled.mat"
    _edit_mat(mat, edit)
    with pytest.raises(DataError, match=rf"nyu_depth_v2_labeled\.mat: {message}"):
        _reader(nyu_files, dataset_path=mat)


@pytest.mark.parametrize("train, test, message", [
    ([1, 2, 25], [3], r"trainNdxs index 25 is out of range 1\.\.24"),
    ([0, 1, 2], [3], r"trainNdxs index 0 is out of range"),
    ([1, 2, 3], [3, 4], r"1 image\(s\) are in both trainNdxs and testNdxs"),
    ([1, 2, 2], [3], r"trainNdxs lists index 2 more than once"),
])
def test_bad_split_indices(nyu_files, tmp_path: Path, train, test, message: str) -> None:
    bad = tmp_path / "bad_splits.mat"
    scipy.io.savemat(bad, {"trainNdxs": np.array(train, np.uint16).reshape(-1, 1),
                           "testNdxs": np.array(test, np.uint16).reshape(-1, 1)})
    with pytest.raises(DataError, match=rf"bad_splits\.mat: {message}"):
        _reader(nyu_files, splits_path=bad)


def test_splits_without_a_key_or_not_v5(nyu_files, tmp_path: Path) -> None:
    bad = tmp_path / "splits.mat"
    scipy.io.savemat(bad, {"trainNdxs": np.array([[1]], np.uint16)})
    with pytest.raises(DataError, match=r"splits\.mat: missing variable 'testNdxs'"):
        _reader(nyu_files, splits_path=bad)
    with pytest.raises(DataError, match=r"labeled\.mat: is a MATLAB v7\.3 \(HDF5\) file"):
        _reader(nyu_files, splits_path=nyu_files.paths.dataset_path)


def test_normals_count_must_match_the_images(nyu_files, tmp_path: Path) -> None:
    root = _copy(nyu_files, tmp_path)
    (root / "normals_gt" / "normals" / "0013.png").unlink()
    with pytest.raises(DataError, match=r"normals_gt: has 23 normal maps for 24 images \(missing 0013\.png\)"):
        _reader(nyu_files, normals_path=root / "normals_gt")
    shutil.copy(root / "normals_gt" / "normals" / "0012.png", root / "normals_gt" / "normals" / "0013.png")
    shutil.copy(root / "normals_gt" / "masks" / "0012.png", root / "normals_gt" / "masks" / "0024.png")
    with pytest.raises(DataError, match=r"has 25 masks for 24 images \(unexpected 0024\.png\)"):
        _reader(nyu_files, normals_path=root / "normals_gt")
    with pytest.raises(DataError, match=r"expected a folder with normals/ and masks/"):
        _reader(nyu_files, normals_path=root / "normals_gt" / "masks")


def test_corrupt_normals_png_and_wrong_size(nyu_files, tmp_path: Path) -> None:
    root = _copy(nyu_files, tmp_path)
    (root / "normals_gt" / "normals" / "0006.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.new("L", (10, 10)).save(root / "normals_gt" / "masks" / "0007.png")
    with _reader(nyu_files, normals_path=root / "normals_gt") as reader:
        reader.read(5)
        with pytest.raises(DataError, match=r"normals/0006\.png: not a readable PNG"):
            reader.read(6)
        with pytest.raises(DataError, match=r"masks/0007\.png: image is 10x10, expected 48x64"):
            reader.read(7)


def test_truncated_or_corrupt_normals_tgz(nyu_files, tmp_path: Path) -> None:
    paths = make_random_dataset(tmp_path / "tgz", nyu_files.n, 0, nyu_files.height, nyu_files.width,
                                normals_as_tgz=True)
    data = paths.normals_path.read_bytes()
    paths.normals_path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=r"normals_gt\.tgz: corrupt or truncated archive"):
        NYUv2Official(paths.dataset_path, paths.splits_path, paths.normals_path)
    paths.normals_path.write_bytes(b"definitely not a tar" * 100)
    with pytest.raises(DataError, match=r"normals_gt\.tgz: not a readable tar/tgz archive"):
        NYUv2Official(paths.dataset_path, paths.splits_path, paths.normals_path)


def test_vocabulary_and_scene_checks(tmp_path: Path) -> None:
    n, h, w = 2, 4, 4
    zeros = np.zeros((n, h, w), np.float32)
    common = dict(images=np.zeros((n, h, w, 3), np.uint8), depths=zeros + 1, raw_depths=zeros,
                  labels=np.zeros((n, h, w), np.uint16), instances=np.zeros((n, h, w), np.uint8),
                  normals=None, normal_masks=None, train_idx=[0], test_idx=[1], val_scenes=None)
    names = official_like_names()
    names[NYU_LABEL_IDS["sofa"] - 1], names[NYU_LABEL_IDS["sofa"]] = names[NYU_LABEL_IDS["sofa"]], "sofa"
    p = write_official_layout(tmp_path / "a", scene_types=["bedroom", "bedroom"], scenes=["b_1", "b_2"],
                              names=names, **common)
    with pytest.raises(DataError, match=r"names puts 'sofa' at id 84, but NYUv2 has it at 83"):
        NYUv2Official(p.dataset_path)
    p = write_official_layout(tmp_path / "b", scene_types=["bedroom", "bedroom"], scenes=["b_1", "b_2"],
                              names=[n.replace("toilet", "loo") for n in official_like_names()], **common)
    with pytest.raises(DataError, match=r"names has no class 'toilet'"):
        NYUv2Official(p.dataset_path)
    p = write_official_layout(tmp_path / "c", scene_types=["bedroom", "spaceship"], scenes=["b_1", "b_2"],
                              **common)
    with pytest.raises(DataError, match=r"image 1 has unknown scene type 'spaceship'"):
        NYUv2Official(p.dataset_path)


def test_val_split_naming_unknown_scenes(nyu_files, tmp_path: Path) -> None:
    bad = tmp_path / "val_split.txt"
    bad.write_text("# comment\nnot_a_scene_0001\n")
    with pytest.raises(DataError, match=r"val_split\.txt: scene 'not_a_scene_0001' is not a scene"):
        _reader(nyu_files, val_split_path=bad)
    test_scene = nyu_files.ground_truth[next(i for i, t in nyu_files.ground_truth.items()
                                             if t["split"] == "test")]["scene_name"]
    bad.write_text(test_scene + "\n")
    with pytest.raises(DataError, match=r"none of its scenes has a training image"):
        _reader(nyu_files, val_split_path=bad)
