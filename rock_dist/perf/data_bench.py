"""Data-pipeline benchmark: samples/s per worker of our shard reader vs a reference-style pipeline, same run.

Called by `python -m rock_dist.bench` (through `run_data_benchmark`) and on its own:

    python -m rock_dist.perf.data_bench --shards shards/nyuv2/train [--num_samples 200] [--json out.json]

Without --shards, synthetic 480x640 rooms (`rock_dist.synthetic.rooms`) are rendered and sharded into a temporary
directory first (rendering takes a while; it is not part of the measurement).

Both pipelines run in this process on ONE thread (torch.set_num_threads(1)), which is what one loader worker gets,
so "samples/s" is per worker = per core. What each measures, per training sample:

- ours: the exact code a loader worker runs (the training stream's worker batches with 0 workers, default data
  mode): indexed reads by seek, JPEG/PNG decoding, SSD crop, flip, resize, depth/normals targets at the aux size,
  collation into batches. By default the colour jitter is only drawn in the worker and applied batched on the
  training device by the augmentation step (`rock_dist.data.device_augment`), like prior matching, which runs
  batched on the device in the criterion; the "jitter in worker" row applies the jitter in the worker instead.
  The "--augment_on device" row is the worker under `--augment_on device`: reads, decoding, the random draws and
  collation of the padded full-size sample; crop, flip, resize and targets move to the batched step. The ratio of
  the two rows is the worker CPU time per sample before / after. The cost of the batched step on this CPU (the
  jitter alone, and the whole device step) is reported too.
- reference-style (vita-epfl/rock-pytorch's recipe, re-implemented here): one pickle per image holding raw arrays
  (as its `prep` writes), PIL images, the same SSD crop, PIL flip/resize, torchvision ColorJitter on PIL, ToTensor +
  Normalize on the CPU, depth as 8-bit PIL scaled by its maximum, PIL nearest resizes of depth/normals, and
  per-sample prior matching + box encoding on the CPU (`rock_dist.model.boxes` with the model's 7228 priors), then
  default collation.

`--scaling` adds a table: samples/s of one rank's DataLoader with 1, 2, 4 and 8 worker processes on the same
samples stored in 1, 8 and 64 shards, in one run. The indexed loader deals samples, not shards, to workers, so the
rate should depend on the workers (up to the cores) and not on the shard count; on a machine with fewer cores than
workers the extra workers share the cores, so those rows show that the plan runs, not more speed.
"""

from __future__ import annotations

if __name__ == "__main__":  # answer --help before the heavy imports below
    from rock_dist.cli import answer_help_early

    answer_help_early("DataBenchConfig")

import itertools
import json
import os
import pickle
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from rock_dist.cli import run_cli
from rock_dist.config import DataBenchConfig, parse_config
from rock_dist.data.batch import collate
from rock_dist.data.device_augment import BatchAugment, Placement
from rock_dist.data.constants import CLASS_NAMES, SCENE_TYPES
from rock_dist.data.loader_spec import TrainLoaderSpec
from rock_dist.data.pipeline import make_train_loader
from rock_dist.data.sources import iter_shard, load_sources
from rock_dist.data.transforms import (BRIGHTNESS, CONTRAST, HUE, IMAGENET_MEAN, IMAGENET_STD, SATURATION,
                                       DecodedSample, TrainTransform, crop_boxes, decode_sample, flip_boxes,
                                       sample_ssd_crop)
from rock_dist.errors import ConfigError

Size = tuple[int, int]


def _target_size(image_size: Size, backbone: str) -> Size:
    # Imports inside functions here keep `import rock_dist.perf.data_bench` (done by bench and perf.report) light.
    from rock_dist.model.priors import feature_map_sizes

    return feature_map_sizes(image_size, backbone)[0]


# ----------------------------------------------------------------------------------------------------------- ours
def _ours_batches(sources: str, image_size: Size, target: Size, batch_size: int, seed: int,
                  jitter: Literal["device", "cpu", "none"], augment_on: str = "workers") -> Iterator[Any]:
    """Endless batches from the worker code path (`augment_on` "workers" or "device"), run in this process:
    what the loader workers ship, without the training process's batched augmentation step."""
    placement = Placement("device" if augment_on == "device" else "workers", torch.device("cpu"))
    stream = make_train_loader(TrainLoaderSpec(sources, image_size=image_size, target_size=target,
                                               batch_size=batch_size, num_workers=0, seed=seed, color_jitter=jitter,
                                               augment_on=placement))
    return stream.worker_batches()


def _time_ours_stages(raws: list[dict[str, Any]], image_size: Size, target: Size, seed: int) -> dict[str, float]:
    """Milliseconds per sample for decoding and for the augmentation alone (same samples), and for the training
    process's batched augmentation step on this CPU (jitter only, and the whole `--augment_on device` step)."""
    start = time.perf_counter()
    decoded = [decode_sample(r) for r in raws]
    t_decode = time.perf_counter() - start
    transform = TrainTransform(image_size, target)
    start = time.perf_counter()
    outs = [transform(s, random.Random(seed + i)) for i, s in enumerate(decoded)]
    t_aug = time.perf_counter() - start
    deferred = TrainTransform(image_size, target, defer_augment=True)
    start = time.perf_counter()
    raw_outs = [deferred(s, random.Random(seed + i)) for i, s in enumerate(decoded)]
    t_draw = time.perf_counter() - start
    # The batched step as the training stream runs it, here on this CPU core (on a GPU it is nearly free).
    step = BatchAugment("cpu", image_size, target)
    batch, raw_batch = collate(outs), collate(raw_outs)
    start = time.perf_counter()
    step(batch)
    t_jitter = time.perf_counter() - start
    start = time.perf_counter()
    step(raw_batch)
    t_step = time.perf_counter() - start
    return {"decode_ms": 1e3 * t_decode / len(raws), "augment_ms": 1e3 * t_aug / len(raws),
            "draw_only_ms": 1e3 * t_draw / len(raws), "device_jitter_ms_on_cpu": 1e3 * t_jitter / len(raws),
            "device_augment_ms_on_cpu": 1e3 * t_step / len(raws)}


def _time_loader(sources: str, n: int, image_size: Size, target: Size, batch_size: int, seed: int,
                 workers: int) -> dict[str, Any]:
    stream = make_train_loader(TrainLoaderSpec(sources, image_size=image_size, target_size=target,
                                               batch_size=batch_size, num_workers=workers, seed=seed))
    rate = _rate(stream.worker_batches(), stream.num_workers, n, batch_size)  # the DataLoader's own output
    return {"workers": stream.num_workers, "samples_per_s": rate, "samples_per_s_per_worker": rate / stream.num_workers}


def _split_copy(raws: list[dict[str, Any]], out: Path, num_shards: int) -> str:
    """The samples written again as `num_shards` tar files of (nearly) equal size under `out`: a source string."""
    from rock_dist.shardbuild.shard_writer import write_shard

    out.mkdir(parents=True, exist_ok=True)
    num_shards = max(1, min(num_shards, len(raws)))
    for k in range(num_shards):
        part = raws[len(raws) * k // num_shards:len(raws) * (k + 1) // num_shards]
        write_shard(out / f"part-{k:06d}.tar", [(str(r["__key__"]), {n: v for n, v in r.items()
                                                                      if not n.startswith("__")}) for r in part])
    return str(out / f"part-{{000000..{num_shards - 1:06d}}}.tar") if num_shards > 1 else str(out / "part-000000.tar")


def run_scaling(raws: list[dict[str, Any]], work: Path, *, image_size: Size, target: Size, batch_size: int,
                seed: int, num_samples: int, workers: Sequence[int] = (1, 2, 4, 8),
                shard_counts: Sequence[int] = (1, 8, 64)) -> list[dict[str, Any]]:
    """Samples/s of one rank's DataLoader per (shard count, worker count), on copies of the same samples."""
    rows = []
    for shards in shard_counts:
        spec = _split_copy(raws, work / f"scaling-{shards}", shards)
        for w in workers:
            stream = make_train_loader(TrainLoaderSpec(spec, image_size=image_size, target_size=target,
                                                       batch_size=batch_size, num_workers=w, seed=seed))
            rate = _rate(stream.worker_batches(), w, num_samples, batch_size)
            rows.append({"shards": len(stream.sources[0].shards), "workers": w, "mode": stream.mode,
                         "samples_per_s": rate, "samples_per_s_per_worker": rate / w})
            del stream  # stops its worker processes before the next row starts its own
    return rows


def _rate(it: Iterator[Any], workers: int, n: int, batch_size: int) -> float:
    """Samples/s of an iterator of batches after a warm-up of one batch per worker."""
    for _ in range(max(1, workers)):  # warm-up: one batch per worker (process start, first decode)
        next(it)
    batches = max(1, n // batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ reference-style
def _write_reference_pickles(raws: list[dict[str, Any]], out: Path) -> list[Path]:
    """One pickle of raw numpy arrays per image with the keys and dtypes the reference's `prep` writes."""
    paths = []
    for i, raw in enumerate(raws):
        s: DecodedSample = decode_sample(raw)
        H, W = s.size
        boxes_px = (s.boxes * torch.tensor([W, H, W, H])).round().int().tolist()
        record = {
            "img": s.image.permute(1, 2, 0).numpy().copy(),
            "depth": (s.depth_mm[0].numpy().astype(np.float32) / 1000.0 if s.depth_mm is not None
                      else np.ones((H, W), np.float32)),
            "normals": (s.normals.permute(1, 2, 0).numpy().copy() if s.normals is not None
                        else np.full((H, W, 3), 128, np.uint8)),
            "mask": (s.normals_mask[0].numpy().copy() if s.normals_mask is not None else np.zeros((H, W), np.uint8)),
            "bboxes": [{"box": b, "labels": int(lab)} for b, lab in zip(boxes_px, s.labels.tolist())],
            "scene_id": max(0, s.scene),
            # The reference also stores the label and instance maps (its prep makes the latter int64) and the
            # vocabularies in every pickle; their content does not matter for the cost of loading them.
            "labels": np.zeros((H, W), np.uint16),
            "label_instance": np.zeros((H, W), np.int64),
            "scene_type": "bedroom", "scene": "bedroom_0001",
            "rock_classes": ["background", *CLASS_NAMES], "unique_scenes": list(SCENE_TYPES),
        }
        path = out / f"{i:05d}.pkl"
        with open(path, "wb") as handle:
            pickle.dump(record, handle, protocol=pickle.HIGHEST_PROTOCOL)
        paths.append(path)
    return paths


class _ReferenceStyle:
    """Per-sample PIL pipeline with CPU prior matching, following the reference's Transformer step by step."""

    def __init__(self, image_size: Size, target: Size, backbone: str) -> None:
        from rock_dist.model.boxes import encode_boxes, match_priors
        from rock_dist.model.priors import make_priors

        self.priors = make_priors(image_size, backbone)
        self.match, self.encode = match_priors, encode_boxes
        self.image_trans = T.Compose([T.Resize(image_size), T.ColorJitter(BRIGHTNESS, CONTRAST, SATURATION, HUE),
                                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        self.aux_trans = T.Compose([T.Resize(target, T.InterpolationMode.NEAREST), T.ToTensor()])

    def __call__(self, path: Path, rng: random.Random) -> dict[str, Any]:
        with open(path, "rb") as handle:
            d = pickle.load(handle)
        img = Image.fromarray(d["img"])
        W, H = img.size
        boxes = torch.tensor([[b["box"][0] / W, b["box"][1] / H, b["box"][2] / W, b["box"][3] / H]
                              for b in d["bboxes"]], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([b["labels"] for b in d["bboxes"]], dtype=torch.int64)
        max_depth = float(d["depth"].max())
        depth = Image.fromarray(np.uint8(255 * d["depth"] / max_depth), "L")
        normals, mask = Image.fromarray(d["normals"]), Image.fromarray(d["mask"])
        scaling = 1.0
        crop = sample_ssd_crop(boxes, (H, W), rng)
        if crop is not None:
            ltrb, keep = crop
            img, depth, normals, mask = (im.crop(ltrb) for im in (img, depth, normals, mask))
            boxes, labels = crop_boxes(boxes[keep], ltrb, (H, W)), labels[keep]
            scaling = W / (ltrb[2] - ltrb[0])
        flip = rng.random() < 0.5
        if flip:
            img, depth, normals, mask = (im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                                         for im in (img, depth, normals, mask))
            boxes = flip_boxes(boxes)
        image = self.image_trans(img)
        depth_t = self.aux_trans(depth) / scaling * max_depth
        n = self.aux_trans(normals) - 0.5
        if flip:
            n[0] = -n[0]
        n = n / n.norm(dim=0).clamp(min=1e-5)
        if scaling != 1:
            n[2] *= scaling
            n = n / n.norm(dim=0).clamp(min=1e-5)
        m = self.aux_trans(mask).bool()
        matched = self.match(boxes[None], labels[None], self.priors)
        loc = self.encode(matched.boxes, self.priors)[0]
        return {"img": image, "bboxes": loc.t().contiguous(), "labels": matched.labels[0], "depth": depth_t,
                "normals": n, "normals_mask": m, "scene_id": d["scene_id"]}


def _reference_batches(paths: list[Path], image_size: Size, target: Size, backbone: str, batch_size: int,
                       seed: int) -> Iterator[Any]:
    """Endless reference-style batches (per-sample pipeline + default collation), in this process."""
    pipe = _ReferenceStyle(image_size, target, backbone)
    rng = random.Random(seed)
    torch.manual_seed(seed)  # ColorJitter draws from torch's global generator, as in the reference
    k = 0
    while True:
        samples = []
        for _ in range(batch_size):
            samples.append(pipe(paths[k % len(paths)], rng))
            k += 1
        yield torch.utils.data.default_collate(samples)


def _time_interleaved(pipelines: dict[str, Iterator[Any]], batches: int, batch_size: int,
                      rounds: int) -> dict[str, dict[str, Any]]:
    """Time each pipeline for `batches` batches, alternating between them in `rounds` chunks.

    Alternating spreads any change in machine load (shared CPUs) evenly over the pipelines being compared.
    """
    for it in pipelines.values():
        next(it)  # warm-up: imports, first allocations, priors
    elapsed = dict.fromkeys(pipelines, 0.0)
    done = dict.fromkeys(pipelines, 0)
    for r in range(rounds):
        chunk = batches * (r + 1) // rounds - batches * r // rounds
        for name, it in pipelines.items():
            start = time.perf_counter()
            for _ in range(chunk):
                next(it)
            elapsed[name] += time.perf_counter() - start
            done[name] += chunk
    return {name: {"samples": done[name] * batch_size, "seconds": elapsed[name],
                   "samples_per_s": done[name] * batch_size / elapsed[name]} for name in pipelines}


# ------------------------------------------------------------------------------------------------------- driver
def _npy_copy(shards: str, out: Path, num_samples: int) -> tuple[str, list[dict[str, Any]]] | None:
    """The benchmark's first shards (whole shards, at least `num_samples` samples) again with depth, normals and
    mask as .npy members (what `shards build --aux_format npy` writes; same arrays): a brace pattern of tars under
    `out` and the transcoded samples; None when no sample has a PNG aux member."""
    from rock_dist.data.npy_member import encode_npy
    from rock_dist.shardbuild.shard_writer import write_shard
    from rock_dist.data.members import aux_member

    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    copied: list[dict[str, Any]] = []
    changed = False
    for shard in (sh for src in load_sources(shards) for sh in src.shards):
        if len(copied) >= num_samples:
            break  # the timing loops over what it has; transcoding a whole data set would only cost time
        samples = []
        for raw in iter_shard(shard):
            members = {k: v for k, v in raw.items() if not k.startswith("__")}
            for name in ("depth", "normals", "mask"):
                tensor = aux_member(members, name, str(raw.get("__key__"))) if f"{name}.png" in members else None
                if tensor is not None:
                    del members[f"{name}.png"]
                    members[f"{name}.npy"] = encode_npy(tensor.numpy())
                    changed = True
            samples.append((str(raw["__key__"]), members))
            copied.append({"__key__": raw["__key__"], **members})
        paths.append(out / f"npy-{len(paths):06d}.tar")
        write_shard(paths[-1], samples)
    if not changed:
        return None
    spec = str(out / f"npy-{{000000..{len(paths) - 1:06d}}}.tar") if len(paths) > 1 else str(paths[0])
    return spec, copied


def _synthetic_shards(out: Path, n: int, seed: int) -> str:
    from rock_dist.config import ShardsBuildConfig
    from rock_dist.synthetic.rooms import make_rooms_dataset
    from rock_dist.shards import build_shards

    paths = make_rooms_dataset(out / "official", n, seed, 480, 640)
    build_shards(ShardsBuildConfig(dataset_path=str(paths.dataset_path), splits_path=str(paths.splits_path),
                                   normals_path=str(paths.normals_path or ""), no_normals=paths.normals_path is None,
                                   out=str(out / "shards"), samples_per_shard=8, num_workers=1, no_progress=True))
    return str(out / "shards" / "train")


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform fallbacks elsewhere)."""
    from rock_dist.engine.recipes import cpuinfo_value

    return cpuinfo_value("model name") or platform.processor() or platform.machine()


def run_data_benchmark(shards: str | None = None, *, num_samples: int = 200, batch_size: int = 8,
                       image_size: Sequence[int] = (480, 640), backbone: str = "resnet50", loader_workers: int = 0,
                       seed: int = 0, rounds: int = 4, scaling: bool = False,
                       work_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Measure both pipelines on the same samples; returns the result dict (also what the CLI prints as JSON).

    The pipelines are timed alternately in `rounds` chunks of `num_samples / rounds` samples each.
    Keys: device, cpu, torch_threads, image_size, target_size, num_samples, ours {samples_per_s, decode_ms,
    augment_ms, draw_only_ms, device_jitter_ms_on_cpu, device_augment_ms_on_cpu}, ours_device_augment
    {samples_per_s}, worker_cost_ratio_workers_over_device, ours_cpu_jitter {samples_per_s}, reference_style
    {samples_per_s},
    speedup_per_core, speedup_per_core_cpu_jitter, target_speedup, meets_target, and loader {workers,
    samples_per_s, samples_per_s_per_worker} when `loader_workers` > 0, scaling [{shards, workers, mode,
    samples_per_s, samples_per_s_per_worker}] with `scaling`.
    """
    if num_samples < batch_size:
        raise ConfigError(f"--num_samples {num_samples}: must be at least --batch_size {batch_size}")
    image_size = (int(image_size[0]), int(image_size[1]))
    target = _target_size(image_size, backbone)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one loader worker = one core
    try:
        with tempfile.TemporaryDirectory(dir=work_dir, prefix="rock_data_bench_") as tmp:
            tmp_path = Path(tmp)
            if not shards:
                # The scaling table needs at least 64 training samples (one per shard in its 64-shard row).
                shards = _synthetic_shards(tmp_path, max(48, num_samples // 4, 120 if scaling else 0), seed)
            sources = load_sources(shards)
            raws: list[dict[str, Any]] = []
            for shard in (sh for src in sources for sh in src.shards):
                raws.extend(iter_shard(shard))
                if len(raws) >= min(num_samples, 64):
                    break
            pickles = _write_reference_pickles(raws, tmp_path)
            npy_copy = _npy_copy(shards, tmp_path / "npy", len(raws))
            pipelines = {
                "ours": _ours_batches(shards, image_size, target, batch_size, seed, "device"),
                "ours_device_augment": _ours_batches(shards, image_size, target, batch_size, seed, "device",
                                                     "device"),
                "ours_cpu_jitter": _ours_batches(shards, image_size, target, batch_size, seed, "cpu"),
                "reference_style": _reference_batches(pickles, image_size, target, backbone, batch_size, seed),
            }
            if npy_copy is not None:
                pipelines["ours_npy"] = _ours_batches(npy_copy[0], image_size, target, batch_size, seed, "device")
            timed = _time_interleaved(pipelines, max(1, num_samples // batch_size), batch_size, rounds)
            ours, ours_cpu_jitter, ref = timed["ours"], timed["ours_cpu_jitter"], timed["reference_style"]
            ours.update(_time_ours_stages(raws, image_size, target, seed))
            result: dict[str, Any] = {
                "device": "cpu", "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": 1,
                "torch": torch.__version__, "shards": shards, "image_size": list(image_size),
                "target_size": list(target), "batch_size": batch_size, "num_samples": ours["samples"],
                "stored_image_size": list(decode_sample(raws[0]).size),
                "ours": ours, "ours_cpu_jitter": ours_cpu_jitter, "reference_style": ref,
                "ours_device_augment": timed["ours_device_augment"],
                # Worker CPU time per sample, --augment_on workers over --augment_on device (same samples, same run).
                "worker_cost_ratio_workers_over_device":
                    timed["ours_device_augment"]["samples_per_s"] / ours["samples_per_s"],
                "speedup_per_core": ours["samples_per_s"] / ref["samples_per_s"],
                "speedup_per_core_cpu_jitter": ours_cpu_jitter["samples_per_s"] / ref["samples_per_s"],
                "target_speedup": 3.0,
            }
            if npy_copy is not None:
                npy_raws = npy_copy[1][:len(raws)]
                timed["ours_npy"]["decode_ms"] = _time_ours_stages(npy_raws, image_size, target, seed)["decode_ms"]
                result["ours_npy"] = timed["ours_npy"]
                result["speedup_per_core_npy"] = timed["ours_npy"]["samples_per_s"] / ref["samples_per_s"]
            result["meets_target"] = max(result["speedup_per_core"],
                                         result.get("speedup_per_core_npy", 0.0)) >= result["target_speedup"]
            if loader_workers > 0:
                torch.set_num_threads(threads)
                result["loader"] = _time_loader(shards, num_samples, image_size, target, batch_size, seed,
                                                loader_workers)
            if scaling:
                torch.set_num_threads(threads)
                # Read only as many samples as the copies hold, not the whole split.
                more = list(itertools.islice((raw for src in sources for sh in src.shards for raw in iter_shard(sh)),
                                             128))
                result["scaling"] = run_scaling(more, tmp_path, image_size=image_size, target=target,
                                                batch_size=batch_size, seed=seed, num_samples=num_samples)
    finally:
        torch.set_num_threads(threads)
    return result


def _text_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, the first row as the header with a rule under it."""
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(width[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in width))
    return lines


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of a `run_data_benchmark` result."""
    ours, ref = result["ours"], result["reference_style"]
    rows = [("pipeline", "samples/s per worker", "ms/sample"),
            ("rock_dist shard reader (jitter on device)", f"{ours['samples_per_s']:.1f}",
             f"{1e3 / ours['samples_per_s']:.1f}"),
            ("rock_dist shard reader (jitter in worker)", f"{result['ours_cpu_jitter']['samples_per_s']:.1f}",
             f"{1e3 / result['ours_cpu_jitter']['samples_per_s']:.1f}"),
            ("rock_dist, --augment_on device (workers decode + draw)",
             f"{result['ours_device_augment']['samples_per_s']:.1f}",
             f"{1e3 / result['ours_device_augment']['samples_per_s']:.1f}"),
            ("reference-style (pickle, PIL, CPU matching)", f"{ref['samples_per_s']:.1f}",
             f"{1e3 / ref['samples_per_s']:.1f}")]
    if "ours_npy" in result:
        rows.insert(2, ("rock_dist shard reader, npy aux members", f"{result['ours_npy']['samples_per_s']:.1f}",
                        f"{1e3 / result['ours_npy']['samples_per_s']:.1f}"))
    if "loader" in result:
        ld = result["loader"]
        rows.append((f"rock_dist DataLoader, {ld['workers']} workers (total)", f"{ld['samples_per_s']:.1f}", "-"))
    lines = _text_table(rows)
    npy = (f", {result['speedup_per_core_npy']:.2f}x from npy aux members"
           if "speedup_per_core_npy" in result else "")
    lines.append(f"speed-up per core: {result['speedup_per_core']:.2f}x with the jitter on the device, "
                 f"{result['speedup_per_core_cpu_jitter']:.2f}x with it in the worker{npy} "
                 f"(target >= {result['target_speedup']:.0f}x)")
    lines.append(f"ours per sample: decode {ours['decode_ms']:.1f} ms, augment {ours['augment_ms']:.1f} ms "
                 f"(draw only, --augment_on device: {ours['draw_only_ms']:.2f} ms); deferred jitter costs "
                 f"{ours['device_jitter_ms_on_cpu']:.1f} ms/sample, the whole --augment_on device step "
                 f"{ours['device_augment_ms_on_cpu']:.1f} ms/sample when the 'device' is this CPU")
    lines.append(f"worker cost per sample, --augment_on workers / device: "
                 f"{result['worker_cost_ratio_workers_over_device']:.2f}x")
    lines.append(f"input {result['image_size'][0]}x{result['image_size'][1]} from stored "
                 f"{result['stored_image_size'][0]}x{result['stored_image_size'][1]}, aux targets "
                 f"{result['target_size'][0]}x{result['target_size'][1]}, {result['num_samples']} samples, "
                 f"1 thread, {result['cpu']}")
    if "scaling" in result:
        lines += ["", format_scaling(result["scaling"], result.get("cpu_count"))]
    return "\n".join(lines)


def format_scaling(rows: list[dict[str, Any]], cpus: int | None) -> str:
    """The scaling rows as a table: one line per shard count, samples/s (per worker) per worker count."""
    workers = sorted({r["workers"] for r in rows})
    head = ["shards"] + [f"{w} worker{'s' if w > 1 else ''}" for w in workers]
    body = []
    for shards in sorted({r["shards"] for r in rows}):
        cells = {r["workers"]: r for r in rows if r["shards"] == shards}
        body.append([str(shards)] + [f"{cells[w]['samples_per_s']:.0f} ({cells[w]['samples_per_s_per_worker']:.0f})"
                                     if w in cells else "-" for w in workers])
    lines = _text_table([head, *body])
    lines.append(f"one rank's DataLoader, samples/s (per worker) by shard count and worker processes; {cpus} CPU(s) "
                 "here: rows with more workers than CPUs share the cores")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(DataBenchConfig, argv)
    result = run_data_benchmark(cfg.shards or None, num_samples=cfg.num_samples, batch_size=cfg.batch_size,
                                image_size=cfg.image_size, backbone=cfg.backbone, loader_workers=cfg.loader_workers,
                                seed=cfg.seed, rounds=cfg.rounds, scaling=cfg.scaling)
    if cfg.json:  # written first: the printing below may hit a closed pipe (`... | head`)
        from rock_dist.fsutil import atomic_write_json

        atomic_write_json(cfg.json, result)
    print(format_table(result), flush=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
