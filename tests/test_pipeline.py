"""WebDataset loaders: batch format, rank/worker splitting, seeded shuffles, eval coverage, resume, mixing, errors."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from rock_dist.data.batch import prepare_batch
from rock_dist.data.manifest import load_manifest
from rock_dist.data.loader_spec import EvalLoaderSpec, TrainLoaderSpec
from rock_dist.data.pipeline import make_eval_loader, make_train_loader
from rock_dist.data.shard_index import INDEX_NAME, cache_index_path
from rock_dist.data.sources import split_source_list
from rock_dist.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from rock_dist.errors import ConfigError, DataError
from rock_dist.shards import verify

IMG = (64, 80)
TGT = (4, 5)


def _train(src: str | Path, **kw):  # type: ignore[no-untyped-def]
    args = dict(image_size=IMG, target_size=TGT, batch_size=2, num_workers=0, seed=0, rank=0, world_size=1)
    args.update(kw)
    start = args.pop("start_sample", 0)
    return make_train_loader(TrainLoaderSpec(str(src), **args), start_sample=start)


def _take(stream, n: int) -> list[dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    return list(itertools.islice(iter(stream), n))


def test_train_batch_format(shard_dir: Path) -> None:
    stream = _train(shard_dir / "train", batch_size=3)
    batch = _take(stream, 1)[0]
    B = 3
    assert batch["images"].shape == (B, 3, *IMG) and batch["images"].dtype == torch.uint8
    M = batch["boxes"].shape[1]
    assert batch["boxes"].shape == (B, M, 4) and batch["boxes"].dtype == torch.float32 and M >= 1
    assert batch["labels"].shape == (B, M) and batch["labels"].dtype == torch.int64
    real = batch["labels"] > 0
    assert bool(((batch["boxes"][real] >= 0) & (batch["boxes"][real] <= 1)).all())
    assert bool((batch["boxes"][~real] == 0).all())
    for key, shape, dtype in [("depth", (B, 1, *TGT), torch.float32), ("normals", (B, 3, *TGT), torch.float32),
                              ("normals_mask", (B, 1, *TGT), torch.bool), ("scene", (B,), torch.int64),
                              ("has_scene", (B,), torch.bool), ("has_depth", (B,), torch.bool),
                              ("has_normals", (B,), torch.bool), ("image_id", (B,), torch.int64),
                              ("orig_size", (B, 2), torch.int64)]:
        assert batch[key].shape == shape and batch[key].dtype == dtype, key
    assert bool(batch["has_depth"].all() and batch["has_normals"].all())
    assert bool((batch["depth"] > 0).all())
    norms = batch["normals"].norm(dim=1, keepdim=True)[batch["normals_mask"]]
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)
    manifest = load_manifest(shard_dir / "train")
    assert batch["orig_size"].tolist()[0] == manifest.image_size
    assert stream.steps_per_epoch == manifest.num_samples // 3


def _ids(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return [int(i) for b in batches for i in b["image_id"]]


@pytest.mark.parametrize("world", [2, 3])
def test_epoch_is_one_permutation_dealt_to_ranks(shard_dir: Path, world: int) -> None:
    """Each image exactly once per epoch over all ranks; every rank takes the same number of steps."""
    manifest = load_manifest(shard_dir / "train")
    n = manifest.num_samples
    streams = [_train(shard_dir / "train", batch_size=1, rank=r, world_size=world, seed=5) for r in range(world)]
    assert {s.mode for s in streams} == {"indexed"}
    assert len({s.steps_per_epoch for s in streams}) == 1
    # Rank r holds global positions r, r + world, ...: the first epoch is positions 0 .. n - 1.
    per_rank = [_ids(_take(s, -(-(n - r) // world))) for r, s in enumerate(streams)]
    flat = [i for ids in per_rank for i in ids]
    assert sorted(flat) == sorted(manifest.image_ids)  # every image once, none twice, across ranks
    for s, ids in zip(streams, per_rank):  # what the workers read is what the plan says, without reading
        assert [f"nyuv2_{i:04d}" for i in ids] == s.planned_keys(len(ids))
    # The stream is endless: more than an epoch is there on every rank.
    assert len(_take(streams[0], 3 * streams[0].steps_per_epoch)) == 3 * streams[0].steps_per_epoch


def test_epochs_are_new_permutations_of_the_whole_split(shard_dir: Path) -> None:
    manifest = load_manifest(shard_dir / "train")
    n = manifest.num_samples
    keys = _train(shard_dir / "train", seed=1).planned_keys(3 * n)
    epochs = [keys[k * n:(k + 1) * n] for k in range(3)]
    every = sorted(f"nyuv2_{i:04d}" for i in manifest.image_ids)
    assert all(sorted(e) == every for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # the epoch enters the permutation's seed
    assert _train(shard_dir / "train", seed=2).planned_keys(n) != epochs[0]  # and so does the seed


def test_batches_do_not_depend_on_the_worker_count(shard_dir: Path) -> None:
    reference = _take(_train(shard_dir / "train", num_workers=0, seed=3), 6)
    for workers in (2, 3):  # real worker processes, batches round-robin
        stream = _train(shard_dir / "train", num_workers=workers, seed=3)
        assert stream.num_workers == workers
        got = _take(stream, 6)
        assert all(torch.equal(a[k], b[k]) for a, b in zip(reference, got) for k in a)


def test_any_world_size_and_worker_count_on_one_shard(nyu_files, tmp_path: Path) -> None:
    from rock_dist.shards import main

    assert main(nyu_files.build_argv(tmp_path / "one", "--samples_per_shard", "100")) == 0
    split = tmp_path / "one" / "train"
    manifest = load_manifest(split)
    assert len(manifest.shards) == 1
    world = 4
    streams = [_train(split, batch_size=2, rank=r, world_size=world, num_workers=3 if r == 0 else 0)
               for r in range(world)]
    steps = -(-manifest.num_samples // (2 * world))  # enough whole steps to cover the epoch
    ids = [_ids(_take(s, steps)) for s in streams]
    assert all(len(i) == 2 * steps for i in ids)  # the same number of steps on every rank
    positions = {}  # global position -> image id: rank r's q-th sample is position q * world + r
    for r, rank_ids in enumerate(ids):
        positions.update({q * world + r: i for q, i in enumerate(rank_ids)})
    first_epoch = [positions[p] for p in range(manifest.num_samples)]
    assert sorted(first_epoch) == sorted(manifest.image_ids)


def test_resume_at_a_global_position_any_layout(shard_dir: Path) -> None:
    # Two real workers and more batches than one epoch, so the resume point crosses workers and epochs.
    full = _take(_train(shard_dir / "train", num_workers=2, seed=3), 12)
    resumed = _take(_train(shard_dir / "train", num_workers=2, seed=3, start_sample=7 * 2), 5)
    for a, b in zip(full[7:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    stream = _train(shard_dir / "train", seed=3, num_workers=2)
    stream.set_start_sample(10 * 2)
    assert torch.equal(_take(stream, 1)[0]["images"], full[10]["images"])
    # Another layout (2 ranks x batch 1) resuming at global position 14: rank r gets positions 14 + r, 16 + r, ...
    # with the same images AND augmentations as the 1-process run, which had them in its batches 7, 8, ...
    ranks = [_take(_train(shard_dir / "train", seed=3, batch_size=1, rank=r, world_size=2, start_sample=14), 4)
             for r in range(2)]
    flat_full = [{k: v[j] for k, v in b.items()} for b in full[7:] for j in range(2)]
    for q in range(4):
        for r in range(2):
            expected = flat_full[2 * q + r]
            assert torch.equal(ranks[r][q]["images"][0], expected["images"])
            assert int(ranks[r][q]["image_id"][0]) == int(expected["image_id"])
    # Different seed: different augmentation.
    other = _take(_train(shard_dir / "train", num_workers=2, seed=4), 1)[0]
    assert not torch.equal(other["images"], full[0]["images"])


def test_stream_mode_more_workers_than_shards_and_exact_resume(shard_dir: Path) -> None:
    n_shards = len(load_manifest(shard_dir / "train").shards)
    kw = dict(mode="stream", seed=3, num_workers=n_shards + 1)
    stream = _train(shard_dir / "train", **kw)
    assert stream.mode == "stream" and stream.num_workers == n_shards + 1
    full = _take(stream, 10)
    assert all(b["images"].shape == (2, 3, *IMG) for b in full)
    resumed = _take(_train(shard_dir / "train", start_sample=6 * 2, **kw), 4)
    for a, b in zip(full[6:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_old_shard_directory_gets_an_index_on_first_use(shard_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    split = tmp_path / "train"
    shutil.copytree(shard_dir / "train", split)
    (split / INDEX_NAME).unlink()  # as built before the index existed
    before = {p.name: p.read_bytes() for p in split.iterdir()}
    keys = _train(split, seed=1).planned_keys(4)
    assert "indexed" in capfd.readouterr().err and (split / INDEX_NAME).is_file()
    assert {p.name: p.read_bytes() for p in split.iterdir() if p.name != INDEX_NAME} == before  # nothing else
    assert keys == _train(shard_dir / "train", seed=1).planned_keys(4)
    # A directory where index.json cannot be written keeps its index in the cache instead.
    (split / INDEX_NAME).unlink()
    (split / INDEX_NAME).mkdir()
    monkeypatch.setenv("ROCK_DIST_CACHE_DIR", str(tmp_path / "cache"))
    assert _train(split, seed=1).planned_keys(4) == keys
    assert str(cache_index_path(split)) in capfd.readouterr().err and cache_index_path(split).is_file()


def test_index_that_does_not_match_its_shard(shard_dir: Path, tmp_path: Path) -> None:
    split = tmp_path / "train"
    shutil.copytree(shard_dir / "train", split)
    index = json.loads((split / INDEX_NAME).read_text())
    first = index["shards"][0]
    for field in ("spans", "crc32"):  # self-consistent entries at the wrong places: the headers tell
        first[field][0], first[field][1] = first[field][1], first[field][0]
    (split / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(DataError, match=f"{first['name']}.*index does not match"):
        _take(_train(split, batch_size=1), 2 * load_manifest(split).num_samples)
    problems, _ = verify(split)
    assert any(INDEX_NAME in p and first["name"] in p for p in problems)


def test_batches_mix_scenes_like_uniform_sampling(tmp_path: Path) -> None:
    """On a split stored scene by scene (3 consecutive frames per scene, shards not shuffled), the mean number of
    distinct scenes per batch over one epoch is within 10 % of what uniform random batches give."""
    from rock_dist.synthetic.official_layout import load_ground_truth, make_random_dataset
    from rock_dist.shards import main

    paths = make_random_dataset(tmp_path / "nyu", 240, 7, 48, 64, with_val=False, with_normals=False)
    truth = load_ground_truth(paths.ground_truth_path)
    assert main(["build", "--dataset_path", str(paths.dataset_path), "--splits_path", str(paths.splits_path),
                 "--out", str(tmp_path / "shards"), "--no_normals", "--num_workers", "1", "--no_progress",
                 "--samples_per_shard", "16", "--shuffle_seed", "-1"]) == 0
    split = tmp_path / "shards" / "train"
    ids = load_manifest(split).image_ids
    scene = {i: truth[i]["scene_name"] for i in ids}
    assert ids == sorted(ids)  # scene-ordered shards: the worst case for shard-level shuffling
    batch, world = 8, 2
    steps = len(ids) // (batch * world)
    distinct = []
    for r in range(world):
        stream = _train(split, batch_size=batch, rank=r, world_size=world, num_workers=2, seed=11)
        distinct += [len({scene[int(i)] for i in b["image_id"]}) for b in _take(stream, steps)]
    measured = sum(distinct) / len(distinct)
    # Uniform sampling without replacement: scene c (n_c of N images) is missed by a batch with probability
    # C(N - n_c, B) / C(N, B).
    n = len(ids)
    sizes = [sum(1 for i in ids if scene[i] == c) for c in set(scene.values())]
    expected = sum(1 - math.comb(n - k, batch) / math.comb(n, batch) for k in sizes)
    print(f"distinct scenes per batch: measured {measured:.2f}, uniform {expected:.2f}")
    assert abs(measured - expected) <= 0.1 * expected, (measured, expected)
    # Reading the shards in order would have given about 3 scenes per batch of 8.
    assert expected > 6


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_eval_every_image_exactly_once(shard_dir: Path, world: int) -> None:
    manifest = load_manifest(shard_dir / "test")
    ids: list[int] = []
    for rank in range(world):
        loader = make_eval_loader(EvalLoaderSpec(str(shard_dir / "test"), image_size=IMG, target_size=TGT,
                                                 batch_size=3, num_workers=2 if rank == 0 else 0, rank=rank,
                                                 world_size=world))
        got = [int(i) for b in loader for i in b["image_id"]]
        assert len(got) == loader.num_samples
        assert len(list(loader)) == len(loader)  # re-iterable, len() is the batch count
        ids += got
    assert sorted(ids) == sorted(manifest.image_ids)


def test_eval_is_deterministic(shard_dir: Path) -> None:
    def run() -> list[dict[str, torch.Tensor]]:
        return list(make_eval_loader(EvalLoaderSpec(str(shard_dir / "test"), image_size=IMG, target_size=TGT,
                                                    batch_size=4, num_workers=0, rank=0, world_size=1)))
    a, b = run(), run()
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_missing_modalities_give_flags(partial_shard_dir: Path) -> None:
    batches = _take(_train(partial_shard_dir / "train", batch_size=4), 6)
    has_scene = torch.cat([b["has_scene"] for b in batches])
    for b in batches:
        assert not bool(b["has_normals"].any())
        assert bool((b["normals"] == 0).all()) and not bool(b["normals_mask"].any())
        assert bool((b["scene"][~b["has_scene"]] == -1).all())
        assert bool((b["scene"][b["has_scene"]] >= 0).all())
    assert bool(has_scene.any()) and not bool(has_scene.all())


def test_mixing_weights(shard_dir: Path, partial_shard_dir: Path) -> None:
    spec = f"{shard_dir / 'train'}:1,{partial_shard_dir / 'train'}:3"
    stream = _train(spec, batch_size=8)
    batches = _take(stream, 20)
    normals = torch.cat([b["has_normals"] for b in batches]).float().mean().item()
    assert 0.12 < normals < 0.40  # expected 1/4 of samples from the set with normals
    total = load_manifest(shard_dir / "train").num_samples + load_manifest(partial_shard_dir / "train").num_samples
    assert stream.steps_per_epoch == total // 8
    resumed = _take(_train(spec, batch_size=8, start_sample=13 * 8), 3)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(batches[13:], resumed))
    with pytest.raises(ConfigError, match="weight"):
        _train(f"{shard_dir / 'train'}:1,{partial_shard_dir / 'train'}")


def test_source_strings(shard_dir: Path) -> None:
    assert split_source_list("a/shard-{000000..000003}.tar:2,pipe:cat b/{x,y}.tar:0.5") == [
        ("a/shard-{000000..000003}.tar", 2.0), ("pipe:cat b/{x,y}.tar", 0.5)]
    names = [s.name for s in load_manifest(shard_dir / "train").shards]
    first, last = names[0][len("shard-"):-4], names[-1][len("shard-"):-4]
    pattern = f"{shard_dir / 'train'}/shard-{{{first}..{last}}}.tar"
    for spec, mode in ((pattern, "indexed"), (f"pipe:cat {pattern}", "stream")):  # pipe: manifest via `cat` too
        stream = _train(spec)
        assert stream.mode == mode
        assert stream.num_samples == load_manifest(shard_dir / "train").num_samples
        assert _take(stream, 1)[0]["images"].shape == (2, 3, *IMG)
    with pytest.raises(DataError, match="not found"):
        _train(str(shard_dir / "nonexistent" / "shard-{0..1}.tar"))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_tar_is_a_data_error(shard_dir: Path, tmp_path: Path, damage: str, workers: int) -> None:
    split = tmp_path / "train"
    shutil.copytree(shard_dir / "train", split)
    victim = split / load_manifest(split).shards[0].name
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    else:
        victim.write_bytes(data[:700] + b"\x13" * 1200 + data[1900:])
    # One worker reads every shard, so the damaged one is reached within the first epoch.
    with pytest.raises(DataError, match=victim.name):
        _take(_train(split, num_workers=workers, batch_size=1), 40)
    with pytest.raises(DataError, match=victim.name):
        list(make_eval_loader(EvalLoaderSpec(str(split), image_size=IMG, target_size=TGT, batch_size=2,
                                             num_workers=workers, rank=0, world_size=1)))


def test_bad_manifest_and_missing_split(tmp_path: Path, shard_dir: Path) -> None:
    with pytest.raises(DataError, match="manifest"):
        _train(tmp_path / "missing")
    split = tmp_path / "train"
    shutil.copytree(shard_dir / "train", split)
    (split / load_manifest(split).shards[-1].name).unlink()
    with pytest.raises(DataError, match="missing"):
        _train(split)
    (split / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="manifest"):
        _train(split)


def test_prepare_batch_normalises_on_device(shard_dir: Path) -> None:
    stream = _train(shard_dir / "train")
    raw = next(stream.worker_batches())
    assert raw["color_jitter"].shape == (2, 8)  # drawn by the workers, applied by the stream's augmentation step
    jittered = prepare_batch(_take(stream, 1)[0], "cpu")
    batch = _take(_train(shard_dir / "train", color_jitter="none"), 1)[0]
    assert "color_jitter" not in batch
    out = prepare_batch(batch, "cpu", channels_last=True)
    assert not torch.allclose(jittered["images"], out["images"])
    assert out["images"].dtype == torch.float32
    assert out["images"].is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (batch["images"].float() / 255 - mean) / std
    assert torch.allclose(out["images"], expected, atol=1e-5)
    assert batch["images"].dtype == torch.uint8  # input untouched
    assert torch.equal(out["boxes"], batch["boxes"])


def test_a_damaged_byte_fails_the_sample_checksum(shard_dir: Path, tmp_path: Path) -> None:
    split = tmp_path / "train"
    shutil.copytree(shard_dir / "train", split)
    index = json.loads((split / INDEX_NAME).read_text())
    entry = index["shards"][-1]
    start, end = entry["spans"][0]
    with open(split / entry["name"], "r+b") as tar:  # one byte inside the sample's last member: headers intact
        tar.seek(end - 600)
        byte = tar.read(1)
        tar.seek(end - 600)
        tar.write(bytes([byte[0] ^ 0xFF]))
    key = entry["keys"][0]
    with pytest.raises(DataError, match=f"{entry['name']}: sample '{key}'.*fails its checksum"):
        _take(_train(split, batch_size=1), 2 * load_manifest(split).num_samples)


def test_shards_read_whole_are_checked_against_their_sha256(shard_dir: Path, tmp_path: Path) -> None:
    split = tmp_path / "train"
    shutil.copytree(shard_dir / "train", split)
    victim = split / load_manifest(split).shards[0].name
    data = bytearray(victim.read_bytes())
    data[-1100] ^= 0xFF  # inside the last member's data or padding: every header and count stays valid
    victim.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{victim.name}: its sha256 differs from the manifest"):
        list(make_eval_loader(EvalLoaderSpec(str(split), image_size=IMG, target_size=TGT, batch_size=2,
                                             num_workers=0, rank=0, world_size=1)))
