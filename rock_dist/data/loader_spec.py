"""What a loader is asked for: one frozen spec per loader kind, instead of a dozen keyword arguments.

`TrainLoaderSpec` is what `data.pipeline.make_train_loader` / `TrainStream` build the training stream of one rank
from; `EvalLoaderSpec` the same for `make_eval_loader` / `EvalLoader`. Commands get them from their run plan
(`engine.run_plan.train_loader_spec`, `eval_loader_spec`); the benchmarks and tests build them directly. The
stream's start position is not part of the spec: it changes while the same stream is reused
(`TrainStream.set_start_sample`). docs/data_pipeline.md describes the options for users.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the spec stays importable without torch (command-line parsing imports it)
    from rock_dist.data.device_augment import AugmentOn, Placement

Size = tuple[int, int]
DataMode = Literal["auto", "indexed", "stream"]
ColorJitter = Literal["device", "cpu", "none"]
DecodeDevice = Literal["cpu", "cuda"]  # data.device_decode's


@dataclass(frozen=True)
class LoaderSpec:
    """What every loader needs: the data, the sizes, the batch, the workers and this rank's place.

    `source`: a split directory, brace pattern, pipe: commands, or (training only) ``SRC[:WEIGHT],...``.
    `num_workers` -1: the pipeline's automatic choice."""

    source: str
    image_size: Size
    target_size: Size
    batch_size: int
    num_workers: int = -1
    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class TrainLoaderSpec(LoaderSpec):
    """The endless training stream of one rank (docs/data_pipeline.md).

    `mode`: "auto" (indexed for local shards, stream otherwise), "indexed" or "stream". `color_jitter`: "device"
    draws the jitter parameters in the workers and applies them in the batched augmentation step on the training
    device (`data.device_augment`); "cpu" applies it in the workers; "none" disables it. `decode_device`: "cpu"
    (the workers decode) or "cuda" (JPEGs decoded batched on the GPU in this process, `data.device_decode`).
    `augment_on`: where crop, flip, resize and the targets are computed, "workers", "device" or "auto"
    (`device_augment.resolve_augment_on`: on the current CUDA device or the CPU), or a `device_augment.Placement`
    naming the training device."""

    seed: int = 0
    force_crops: bool = False
    no_crops: bool = False
    shuffle_buffer: int = 256
    color_jitter: ColorJitter = "device"
    mode: DataMode = "auto"
    decode_device: DecodeDevice = "cpu"
    augment_on: AugmentOn | Placement = "auto"


@dataclass(frozen=True)
class EvalLoaderSpec(LoaderSpec):
    """Deterministic evaluation batches of one split (a split directory or a single source string) for one rank:
    every image exactly once over all ranks (docs/evaluation.md)."""


__all__ = ["LoaderSpec", "TrainLoaderSpec", "EvalLoaderSpec", "DataMode", "ColorJitter", "Size"]
