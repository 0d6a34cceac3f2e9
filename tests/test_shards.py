"""The shard builder and verifier: member format, manifests, ground truth round trip, safety, and bad input."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from rock_dist.data.constants import CLASS_NAMES, SCENE_TYPES
from rock_dist.data.manifest import BUILDER_VERSION, load_manifest
from rock_dist.errors import ConfigError, DataError
from rock_dist.data.shard_index import INDEX_NAME, read_index, scan_shard
from rock_dist.shardbuild.nyuv2 import NYUv2Official
from rock_dist.shards import auto_samples_per_shard, main, shard_order, verify
from rock_dist.synthetic.official_layout import make_random_dataset

from numerics import HANG_GUARD_S

from conftest import PARTIAL_MISSING_SCENE

REPO = Path(__file__).resolve().parents[1]


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def _write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    """Rewrite a shard from {key: {ext: bytes}} (for tests that break members on purpose)."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _split_samples(split_dir: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in load_manifest(split_dir).shard_paths():
        out.update(_read_tar(Path(shard)))
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rock_dist.shards", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)


def _shard_hashes(out: Path) -> dict[str, list[str]]:
    return {s: [x.sha256 for x in load_manifest(out / s).shards] for s in ("train", "val", "test")
            if (out / s).exists()}


# ------------------------------------------------------------------------------------------- format round trip
def test_manifests_describe_the_splits(shard_dir: Path, nyu_files) -> None:
    assert sorted(p.name for p in shard_dir.iterdir()) == ["test", "train", "val"]
    for split in ("train", "val", "test"):
        m = load_manifest(shard_dir / split)
        expected = sorted(i for i, t in nyu_files.ground_truth.items() if t["split"] == split)
        assert m.split == split and m.dataset == "nyuv2" and m.builder_version == BUILDER_VERSION
        # Dealt to shards in the seeded order of shard_order (sorted within each shard), recorded in the manifest.
        assert sorted(m.image_ids) == expected and m.num_samples == len(expected)
        order = shard_order(expected, 0)
        assert m.extra["shuffle_seed"] == 0 and m.extra["samples_per_shard"] == 4
        assert m.image_ids == [i for k in range(0, len(order), 4) for i in sorted(order[k:k + 4])]
        assert [s.num_samples for s in m.shards][:-1] == [4] * (len(m.shards) - 1)
        index = read_index(shard_dir / split / INDEX_NAME)
        assert index is not None and [index[s.name] for s in m.shards] == [scan_shard(p) for p in m.shard_paths()]
        assert sum(s.num_samples for s in m.shards) == m.num_samples
        assert m.class_names == list(CLASS_NAMES) and m.scene_types == list(SCENE_TYPES)
        assert m.image_size == [nyu_files.height, nyu_files.width]
        assert m.modalities == {"rgb": m.num_samples, "depth": m.num_samples, "normals": m.num_samples,
                                "scene": m.num_samples}
        for shard, path in zip(m.shards, m.shard_paths()):
            data = Path(path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes
        mat = nyu_files.paths.dataset_path
        assert m.sources[mat.name] == {"sha256": hashlib.sha256(mat.read_bytes()).hexdigest(),
                                       "bytes": mat.stat().st_size, "role": "dataset"}
        assert {v["role"] for v in m.sources.values()} == {"dataset", "splits", "normals", "val_split"}
    assert (shard_dir / "train" / "manifest.json").stat().st_mode & 0o044 == 0o044  # readable by others
    assert not list(shard_dir.parent.glob(".*building*"))


def test_samples_round_trip_against_ground_truth(shard_dir: Path, nyu_files) -> None:
    reader = NYUv2Official(nyu_files.paths.dataset_path, nyu_files.paths.splits_path, nyu_files.paths.normals_path)
    seen = []
    for split in ("train", "val", "test"):
        for key, members in _split_samples(shard_dir / split).items():
            assert set(members) == {"rgb.jpg", "depth.png", "normals.png", "mask.png", "scene.cls", "json"}
            meta = json.loads(members["json"])
            i = meta["image_id"]
            truth = nyu_files.ground_truth[i]
            assert key == f"nyuv2_{i:04d}" and truth["split"] == split
            assert (meta["height"], meta["width"]) == (nyu_files.height, nyu_files.width)
            assert sorted(map(tuple, (b + [c] for b, c in zip(meta["boxes"], meta["labels"])))) == \
                sorted(map(tuple, (b + [c] for b, c in zip(truth["boxes"], truth["labels"]))))
            assert int(members["scene.cls"]) == truth["scene_id"]
            assert meta["scene_type"] == SCENE_TYPES[truth["scene_id"]] and meta["scene_name"] == truth["scene_name"]
            depth = np.asarray(Image.open(io.BytesIO(members["depth.png"])))
            assert depth.dtype == np.uint16
            np.testing.assert_array_equal(depth, np.rint(reader.read_depth(i) * 1000).astype(np.uint16))
            assert members["normals.png"] == (nyu_files.paths.normals_path / "normals" / f"{i:04d}.png").read_bytes()
            mask = np.asarray(Image.open(io.BytesIO(members["mask.png"])))
            assert set(np.unique(mask).tolist()) <= {0, 255}
            rgb = np.asarray(Image.open(io.BytesIO(members["rgb.jpg"])), dtype=np.float64)
            original = reader.read_rgb(i)
            # JPEG (4:2:0) on per-pixel colour noise: small errors, colours preserved on average.
            assert np.abs(rgb - original).mean() < 10
            np.testing.assert_allclose(rgb.mean(axis=(0, 1)), original.mean(axis=(0, 1)), atol=2)
            seen.append(i)
    assert sorted(seen) == list(range(nyu_files.n))
    reader.close()


def test_webdataset_groups_members_by_key(shard_dir: Path) -> None:
    m = load_manifest(shard_dir / "train")
    samples = list(wds.WebDataset(m.shard_paths(), shardshuffle=False, empty_check=False))
    assert [int(s["__key__"].split("_")[1]) for s in samples] == m.image_ids
    assert all({"rgb.jpg", "depth.png", "json", "scene.cls"} <= set(s) for s in samples)


def test_png_rgb_is_lossless_and_tgz_normals_give_identical_shards(nyu_files, tmp_path: Path) -> None:
    out = tmp_path / "png"
    assert main(nyu_files.build_argv(out, "--image_format", "png", "--samples_per_shard", "50")) == 0
    reader = NYUv2Official(nyu_files.paths.dataset_path)
    for members in _split_samples(out / "test").values():
        i = json.loads(members["json"])["image_id"]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(members["rgb.png"]))), reader.read_rgb(i))
    reader.close()
    # The same images with normals_gt.tgz instead of the folder: shards are byte-identical (read in place).
    paths = make_random_dataset(tmp_path / "tgz", nyu_files.n, 0, nyu_files.height, nyu_files.width,
                                normals_as_tgz=True)
    tgz_out = tmp_path / "from_tgz"
    argv = ["build", "--dataset_path", str(paths.dataset_path), "--splits_path", str(paths.splits_path),
            "--normals_path", str(paths.normals_path), "--val_split_path", str(paths.val_split_path),
            "--out", str(tgz_out), "--num_workers", "1", "--no_progress", "--image_format", "png",
            "--samples_per_shard", "50"]
    assert main(argv) == 0
    assert _shard_hashes(tgz_out) == _shard_hashes(out)


def test_npy_aux_members_decode_exactly_like_png(nyu_files, shard_dir: Path, tmp_path: Path) -> None:
    from rock_dist.data.transforms import decode_sample

    out = tmp_path / "npy"
    assert main(nyu_files.build_argv(out, "--aux_format", "npy")) == 0
    assert verify(out)[0] == []
    for split in ("train", "val", "test"):
        assert load_manifest(out / split).modalities == load_manifest(shard_dir / split).modalities
        png, npy = _split_samples(shard_dir / split), _split_samples(out / split)
        assert png.keys() == npy.keys()
        for key in png:
            assert {e for e in npy[key] if e.endswith(".npy")} <= {"depth.npy", "normals.npy", "mask.npy"}
            assert not any(e.endswith(".png") and e != "rgb.png" for e in npy[key])
            a = decode_sample({"__key__": key, **png[key]})
            b = decode_sample({"__key__": key, **npy[key]})
            for field in ("image", "depth_mm", "normals", "normals_mask"):
                x, y = getattr(a, field), getattr(b, field)
                assert (x is None) == (y is None), field
                if x is not None:
                    assert x.dtype == y.dtype and torch.equal(x, y), (key, field)
    # A broken .npy member is named by verify and by the reader.
    split = out / "test"
    manifest = json.loads((split / "manifest.json").read_text())
    shard = split / manifest["shards"][0]["name"]
    samples = _read_tar(shard)
    key = next(k for k, m in samples.items() if "depth.npy" in m)
    samples[key]["depth.npy"] = samples[key]["depth.npy"][:60]
    _write_tar(shard, samples)
    assert any(f"{key}.depth.npy: does not load as .npy" in p for p in verify(split)[0])
    with pytest.raises(DataError, match="cannot decode"):
        decode_sample({"__key__": key, **samples[key]})


def test_missing_modalities_are_absent_members(partial_shard_dir: Path, partial_nyu_files) -> None:
    assert sorted(p.name for p in partial_shard_dir.iterdir()) == ["test", "train"]
    for split in ("train", "test"):
        m = load_manifest(partial_shard_dir / split)
        missing_here = [i for i in m.image_ids if i in PARTIAL_MISSING_SCENE]
        assert m.dataset == "partial"
        assert m.modalities == {"rgb": m.num_samples, "depth": m.num_samples, "normals": 0,
                                "scene": m.num_samples - len(missing_here)}
        for key, members in _split_samples(partial_shard_dir / split).items():
            assert key.startswith("partial_")
            assert "normals.png" not in members and "mask.png" not in members
            meta = json.loads(members["json"])
            truth = partial_nyu_files.ground_truth[meta["image_id"]]
            if meta["image_id"] in PARTIAL_MISSING_SCENE:
                assert "scene.cls" not in members and meta["scene_type"] is None and truth["scene_id"] is None
            else:
                assert int(members["scene.cls"]) == truth["scene_id"]
    assert sum(load_manifest(partial_shard_dir / s).modalities["scene"] for s in ("train", "test")) == \
        partial_nyu_files.n - len(PARTIAL_MISSING_SCENE)
    problems, _ = verify(partial_shard_dir)
    assert problems == []


def test_several_workers_give_identical_shards(nyu_files, shard_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "mp"
    argv = nyu_files.build_argv(out, "--samples_per_shard", "4")
    argv[argv.index("--num_workers") + 1] = "2"
    assert main(argv) == 0
    assert _shard_hashes(out) == _shard_hashes(shard_dir)
    assert [load_manifest(out / s).image_ids for s in ("train", "val", "test")] == \
        [load_manifest(shard_dir / s).image_ids for s in ("train", "val", "test")]


# ------------------------------------------------------------------------------------------------------ verify
def test_verify_cli_accepts_good_shards(shard_dir: Path) -> None:
    result = _cli("verify", str(shard_dir))
    assert result.returncode == 0, result.stderr
    assert "train: " in result.stdout and "OK" in result.stdout
    assert verify(shard_dir / "val") == ([], [f"val: {load_manifest(shard_dir / 'val').num_samples} samples in "
                                              f"{len(load_manifest(shard_dir / 'val').shards)} shard(s) OK"])


def test_verify_reports_each_problem(shard_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(shard_dir, out)
    train = out / "train"
    truncated = train / "shard-000000.tar"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    flipped = train / "shard-000001.tar"
    data = bytearray(flipped.read_bytes())
    data[1000] ^= 0xFF  # inside the first member's payload: same size, different checksum
    flipped.write_bytes(bytes(data))
    (out / "test" / "shard-000001.tar").unlink()
    shutil.copy(out / "test" / "shard-000000.tar", out / "test" / "shard-000099.tar")
    problems, _ = verify(out)
    text = "\n".join(problems)
    assert "shard-000000.tar: corrupt or truncated tar" in text
    assert "train/shard-000000.tar: 5000 bytes, manifest says" in text
    assert "train/shard-000001.tar: sha256" in text
    assert "test/shard-000001.tar: listed in the manifest but missing" in text
    assert "test/shard-000099.tar: not listed in" in text
    result = _cli("verify", str(out))
    assert result.returncode == 1
    assert result.stderr.count("problem: ") == len(problems) and "error: " in result.stderr


def test_verify_decodes_every_member(shard_dir: Path, tmp_path: Path) -> None:
    """A shard whose checksum is right but whose members are broken is still caught."""
    out = tmp_path / "copy"
    shutil.copytree(shard_dir, out)
    split = out / "val"
    manifest = json.loads((split / "manifest.json").read_text())
    shard = split / manifest["shards"][0]["name"]
    samples = _read_tar(shard)
    keys = list(samples)
    samples[keys[0]]["rgb.jpg"] = samples[keys[0]]["rgb.jpg"][:200]  # truncated JPEG
    meta = json.loads(samples[keys[-1]]["json"])
    meta["labels"][0] = 20  # not a class id
    samples[keys[-1]]["json"] = json.dumps(meta).encode()
    samples[keys[-1]]["scene.cls"] = b"27"
    _write_tar(shard, samples)
    manifest["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    manifest["shards"][0]["bytes"] = shard.stat().st_size
    (split / "manifest.json").write_text(json.dumps(manifest))
    problems, _ = verify(split)
    text = "\n".join(problems)
    assert f"{keys[0]}.rgb.jpg: does not decode" in text
    assert f"{keys[-1]}.json: label 20 is not a class id" in text
    assert f"{keys[-1]}.scene.cls: '27' is not a scene id" in text
    assert "sha256" not in text
    assert verify(split, decode=False)[0] != problems  # counts/checksums alone cannot see it


def test_load_manifest_errors(tmp_path: Path, shard_dir: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere/manifest\.json: shard manifest not found"):
        load_manifest(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad/manifest\.json: not a readable JSON manifest"):
        load_manifest(bad)
    raw = json.loads((shard_dir / "train" / "manifest.json").read_text())
    raw["num_samples"] += 1
    (bad / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"num_samples .* disagrees with the shards"):
        load_manifest(bad)


# ------------------------------------------------------------------------------------------ re-runs and safety
def test_rebuild_replaces_cleanly_and_drops_stale_splits(nyu_files, shard_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(nyu_files.build_argv(out, "--samples_per_shard", "4")) == 0
    (tmp_path / f".{out.name}.building-999999999").mkdir()  # left by a killed build (no such process)
    assert main(nyu_files.build_argv(out, "--samples_per_shard", "4")) == 0
    assert _shard_hashes(out) == _shard_hashes(shard_dir)  # deterministic: same bytes on every build
    assert not list(tmp_path.glob(f".{out.name}.building-*"))
    argv = nyu_files.build_argv(out, "--samples_per_shard", "100")
    del argv[argv.index("--val_split_path"):argv.index("--val_split_path") + 2]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]  # the old val is not left beside it
    assert len(load_manifest(out / "train").shards) == 1


def test_a_different_dataset_is_refused_unless_overwrite(nyu_files, partial_nyu_files, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(nyu_files.build_argv(out)) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    result = _cli(*partial_nyu_files.build_argv(out))
    assert result.returncode == 2
    assert f"error: {out}: already holds a different dataset" in result.stderr and "--overwrite" in result.stderr
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    assert main(partial_nyu_files.build_argv(out, "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    assert load_manifest(out / "train").sources[partial_nyu_files.paths.dataset_path.name]["sha256"] == \
        hashlib.sha256(partial_nyu_files.paths.dataset_path.read_bytes()).hexdigest()
    foreign = tmp_path / "foreign"
    (foreign / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"foreign/train: exists but has no manifest\.json"):
        main(nyu_files.build_argv(foreign, "--overwrite"))


def test_failed_build_leaves_previous_output_and_no_partial_one(nyu_files, tmp_path: Path) -> None:
    root = tmp_path / "files"
    shutil.copytree(nyu_files.paths.dataset_path.parent, root)
    out = tmp_path / "out"
    argv = nyu_files.build_argv(out)
    argv = [a.replace(str(nyu_files.paths.dataset_path.parent), str(root)) for a in argv]
    assert main(argv) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    last = max(i for i, t in nyu_files.ground_truth.items() if t["split"] == "test")
    (root / "normals_gt" / "normals" / f"{last:04d}.png").write_bytes(b"broken")
    with pytest.raises(DataError, match=rf"normals/{last:04d}\.png: not a readable PNG"):
        main(argv)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    fresh = tmp_path / "fresh"
    with pytest.raises(DataError):
        main([a if a != str(out) else str(fresh) for a in argv])
    assert not fresh.exists()
    assert not list(tmp_path.glob(".*building*"))


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_via_the_cli(nyu_files, tmp_path: Path) -> None:
    out = tmp_path / "out"
    missing = _cli(*[a if a != str(nyu_files.paths.dataset_path) else str(tmp_path / "absent.mat")
                     for a in nyu_files.build_argv(out)])
    assert missing.returncode == 2 and "absent.mat: dataset file not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    v5 = _cli(*[a if a != str(nyu_files.paths.dataset_path) else str(nyu_files.paths.splits_path)
                for a in nyu_files.build_argv(out)])
    assert v5.returncode == 2 and "splits.mat: is a MATLAB v5 file, not the v7.3" in v5.stderr
    argv = nyu_files.build_argv(out)
    i = argv.index("--normals_path")
    del argv[i:i + 2]
    no_normals = _cli(*argv)
    assert no_normals.returncode == 2 and "--normals_path" in no_normals.stderr and "--no_normals" in no_normals.stderr
    assert not out.exists()


def test_bad_inputs_in_process(nyu_files, tmp_path: Path) -> None:
    import scipy.io

    out = tmp_path / "out"
    root = tmp_path / "files"
    shutil.copytree(nyu_files.paths.dataset_path.parent, root)
    argv = [a.replace(str(nyu_files.paths.dataset_path.parent), str(root)) for a in nyu_files.build_argv(out)]
    scipy.io.savemat(root / "splits.mat", {"trainNdxs": np.array([[1], [99]], np.uint16),
                                           "testNdxs": np.array([[2]], np.uint16)})
    with pytest.raises(DataError, match=r"splits\.mat: trainNdxs index 99 is out of range 1\.\.24"):
        main(argv)
    scipy.io.savemat(root / "splits.mat", {"trainNdxs": np.array([[1], [2]], np.uint16),
                                           "testNdxs": np.array([[2]], np.uint16)})
    with pytest.raises(DataError, match=r"splits\.mat: 1 image\(s\) are in both trainNdxs and testNdxs"):
        main(argv)
    shutil.copy(nyu_files.paths.splits_path, root / "splits.mat")
    (root / "normals_gt" / "masks" / "0000.png").unlink()
    with pytest.raises(DataError, match=r"normals_gt: has 23 masks for 24 images"):
        main(argv)
    with pytest.raises(ConfigError, match=r"--samples_per_shard -1"):
        main(nyu_files.build_argv(out, "--samples_per_shard", "-1"))
    with pytest.raises(ConfigError, match=r"--shuffle_seed -2"):
        main(nyu_files.build_argv(out, "--shuffle_seed", "-2"))
    with pytest.raises(ConfigError, match=r"--dataset_name 'a\.b'"):
        main(nyu_files.build_argv(out, "--dataset_name", "a.b"))
    assert not out.exists() and not list(tmp_path.glob(".*building*"))


def test_a_failed_install_restores_the_previous_output(tmp_path, monkeypatch) -> None:
    import os

    from rock_dist import shards as shards_cli

    out = tmp_path / "out"
    for split in ("train", "test"):
        (out / split).mkdir(parents=True)
        (out / split / "manifest.json").write_text(f'{{"old": "{split}"}}')
    tmp_root = tmp_path / ".building"
    for split in ("train", "test"):
        (tmp_root / split).mkdir(parents=True)
        (tmp_root / split / "manifest.json").write_text(f'{{"new": "{split}"}}')
    real_rename = os.rename

    def failing_rename(src, dst):  # the second new split cannot be moved in (e.g. disk trouble)
        if str(src) == str(tmp_root / "test"):
            raise OSError("simulated failure")
        return real_rename(src, dst)

    monkeypatch.setattr(shards_cli.os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        shards_cli._install(tmp_root, out, ["train", "test"])
    for split in ("train", "test"):
        assert (out / split / "manifest.json").read_text() == f'{{"old": "{split}"}}'


def test_automatic_shard_size_rule() -> None:
    # At least 64 shards where that leaves 16+ samples each; never under 16 or over 1000 samples per shard.
    assert [auto_samples_per_shard(n) for n in (9, 673, 795, 1024, 1025, 64_000, 1_000_000)] == \
        [16, 16, 16, 16, 17, 1000, 1000]


def test_shards_mix_scenes_and_keep_order_on_request(nyu_files, tmp_path: Path) -> None:
    """The synthetic frames are stored scene by scene like NYUv2; shuffled shards each mix several scenes."""
    scene_of = {i: t["scene_name"] for i, t in nyu_files.ground_truth.items()}

    def scenes_per_shard(out: Path) -> list[int]:
        m = load_manifest(out / "test")
        ids = iter(m.image_ids)
        return [len({scene_of[next(ids)] for _ in range(s.num_samples)}) for s in m.shards]

    assert main(nyu_files.build_argv(tmp_path / "kept", "--samples_per_shard", "4", "--shuffle_seed", "-1")) == 0
    assert main(nyu_files.build_argv(tmp_path / "mixed", "--samples_per_shard", "4")) == 0
    kept, mixed = scenes_per_shard(tmp_path / "kept"), scenes_per_shard(tmp_path / "mixed")
    assert load_manifest(tmp_path / "kept" / "test").image_ids == sorted(load_manifest(tmp_path / "kept" / "test")
                                                                       .image_ids)
    assert sum(mixed) > sum(kept), (kept, mixed)
    assert main(nyu_files.build_argv(tmp_path / "auto")) == 0  # default: automatic size, one shard of 12 here
    assert [s.num_samples for s in load_manifest(tmp_path / "auto" / "test").shards] == [12]
