"""WebDataset loaders: batch format, rank/worker splitting, seeded shuffles, eval coverage, resume, mixing, errors."""

from __future__ import annotations

import itertools
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from rock_dist.data.batch import prepare_batch
from rock_dist.data.manifest import load_manifest
from rock_dist.data.pipeline import make_eval_loader, make_train_loader
from rock_dist.data.sources import split_source_list
from rock_dist.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from rock_dist.errors import ConfigError, DataError

IMG = (64, 80)
TGT = (4, 5)


def _train(src: str | Path, **kw):  # type: ignore[no-untyped-def]
    args = dict(image_size=IMG, target_size=TGT, batch_size=2, num_workers=0, seed=0, rank=0, world_size=1)
    args.update(kw)
    return make_train_loader(str(src), **args)


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


def test_ranks_split_disjoint_and_complete(shard_dir: Path) -> None:
    manifest = load_manifest(shard_dir / "train")
    world = 2
    streams = [_train(shard_dir / "train", batch_size=1, rank=r, world_size=world, seed=5) for r in range(world)]
    assert streams[0].steps_per_epoch == streams[1].steps_per_epoch == manifest.num_samples // world
    seen: list[set[int]] = []
    for s in streams:
        n = s.rank_epoch_samples()
        ids = [int(b["image_id"][0]) for b in _take(s, n)]
        assert len(ids) == len(set(ids)) == n
        seen.append(set(ids))
        # The stream repeats epochs: more batches than one epoch are available on every rank.
        assert len(_take(s, n + 3 * s.steps_per_epoch)) == n + 3 * s.steps_per_epoch
    assert not (seen[0] & seen[1])
    assert seen[0] | seen[1] == set(manifest.image_ids)


def test_shard_shuffle_shared_by_ranks_and_changes_with_epoch(shard_dir: Path) -> None:
    shards = load_manifest(shard_dir / "train").shard_paths()
    world = 2
    orders = []
    for epoch in range(6):
        per_rank = [_train(shard_dir / "train", rank=r, world_size=world, seed=1, epoch=epoch).worker_shards()[0][0]
                    for r in range(world)]
        # Same seeded global order on every rank: rank r holds positions r, r + world, ... of it.
        merged = [None] * len(shards)
        for r, urls in enumerate(per_rank):
            merged[r::world] = urls
        assert sorted(merged) == sorted(shards)  # type: ignore[type-var]
        orders.append(tuple(merged))
    assert len(set(orders)) > 1  # the epoch enters the shuffle seed


def test_workers_split_disjoint(shard_dir: Path) -> None:
    stream = _train(shard_dir / "train", num_workers=2)
    per_worker = [urls for w in stream.worker_shards() for urls in w]
    assert stream.num_workers == 2
    flat = [u for urls in per_worker for u in urls]
    assert len(flat) == len(set(flat)) == len(load_manifest(shard_dir / "train").shards)
    assert all(per_worker)
    batches = _take(stream, 6)  # real worker processes, batches round-robin
    assert all(b["images"].shape == (2, 3, *IMG) for b in batches)


def test_too_few_shards(shard_dir: Path) -> None:
    n = len(load_manifest(shard_dir / "train").shards)
    with pytest.raises(DataError, match="rank"):
        _train(shard_dir / "train", world_size=n + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = _train(shard_dir / "train", num_workers=n + 3)
    assert stream.num_workers == n and any("workers" in str(w.message) for w in caught)


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_eval_every_image_exactly_once(shard_dir: Path, world: int) -> None:
    manifest = load_manifest(shard_dir / "test")
    ids: list[int] = []
    for rank in range(world):
        loader = make_eval_loader(str(shard_dir / "test"), image_size=IMG, target_size=TGT, batch_size=3,
                                  num_workers=2 if rank == 0 else 0, rank=rank, world_size=world)
        got = [int(i) for b in loader for i in b["image_id"]]
        assert len(got) == loader.num_samples
        assert len(list(loader)) == len(loader)  # re-iterable, len() is the batch count
        ids += got
    assert sorted(ids) == sorted(manifest.image_ids)


def test_eval_is_deterministic(shard_dir: Path) -> None:
    def run() -> list[dict[str, torch.Tensor]]:
        return list(make_eval_loader(str(shard_dir / "test"), image_size=IMG, target_size=TGT, batch_size=4,
                                     num_workers=0, rank=0, world_size=1))
    a, b = run(), run()
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_resume_start_batch_is_exact(shard_dir: Path) -> None:
    # Two real workers and more batches than one epoch, so the skip crosses workers and epochs.
    full = _take(_train(shard_dir / "train", num_workers=2, seed=3), 12)
    resumed = _take(_train(shard_dir / "train", num_workers=2, seed=3, start_batch=7), 5)
    for a, b in zip(full[7:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    stream = _train(shard_dir / "train", seed=3, num_workers=2)
    stream.set_start_batch(10)
    assert torch.equal(_take(stream, 1)[0]["images"], full[10]["images"])
    # Different seed: different augmentation.
    other = _take(_train(shard_dir / "train", num_workers=2, seed=4), 1)[0]
    assert not torch.equal(other["images"], full[0]["images"])


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
    resumed = _take(_train(spec, batch_size=8, start_batch=13), 3)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(batches[13:], resumed))
    with pytest.raises(ConfigError, match="weight"):
        _train(f"{shard_dir / 'train'}:1,{partial_shard_dir / 'train'}")


def test_source_strings(shard_dir: Path) -> None:
    assert split_source_list("a/shard-{000000..000003}.tar:2,pipe:cat b/{x,y}.tar:0.5") == [
        ("a/shard-{000000..000003}.tar", 2.0), ("pipe:cat b/{x,y}.tar", 0.5)]
    names = [s.name for s in load_manifest(shard_dir / "train").shards]
    first, last = names[0][len("shard-"):-4], names[-1][len("shard-"):-4]
    pattern = f"{shard_dir / 'train'}/shard-{{{first}..{last}}}.tar"
    for spec in (pattern, f"pipe:cat {pattern}"):  # the pipe: source fetches its manifest with `cat` too
        stream = _train(spec)
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
        list(make_eval_loader(str(split), image_size=IMG, target_size=TGT, batch_size=2, num_workers=workers, rank=0,
                              world_size=1))


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
    batch = _take(_train(shard_dir / "train"), 1)[0]
    assert batch["color_jitter"].shape == (2, 8)  # deferred to the device by default
    jittered = prepare_batch(batch, "cpu")
    batch.pop("color_jitter")
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
