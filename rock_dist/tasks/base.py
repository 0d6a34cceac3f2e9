"""The contract of one auxiliary task of the ROCK block: what each module of rock_dist.tasks declares.

An `AuxTask` says, in one place, everything the rest of the package needs about its task (docs/architecture.md,
"Auxiliary tasks"): the batch keys of its target and of its presence flags, the head of its ROCK branch (`channels`
of the task map and `predict`, which pools that map into the prediction), its `loss` on a batch, the `count` of
items that loss averages over (what the global normalisation all-reduces), its fixed weight in the total loss
(docs/losses.md), its evaluation metrics (`image_stats` per image, `aggregate` over the evaluated set), and its
TensorBoard `pictures`, the picture of a prediction at an image's original size (`original_picture`, `describe`:
rock_dist.detect), and its data side: the shard members it decodes (`decode` into named fields of the decoded
sample), whether a sample has its target (`present`), the kind of target (`target_kind`: one `label` per image, or a
dense `map` sampled at the target size following the crop, flip and zoom: `sample_maps` per sample in the loader
workers, `sample_maps_batched` on the training device) and its stand-in when the target is missing. Consumers
(rock_dist.model.rock_block, rock_dist.model.losses, rock_dist.engine.normalization, rock_dist.engine.metrics,
rock_dist.engine.tensorboard, rock_dist.data.transforms, rock_dist.data.device_augment, rock_dist.data.batch,
rock_dist.detect) take the tasks from rock_dist.tasks.registry.

Also the masked-mean helpers every task loss shares and the index grids of the map sampling (`MapGrid`,
`BatchGrid`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from rock_dist.config import LossConfig, ModelConfig
    from rock_dist.data.geometry import Geometry

# A batch of docs/data_format.md (tensors by key) and one image's per-task evaluation record (None: no target).
Batch = Mapping[str, torch.Tensor]


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ values·weights / Σ weights, and exactly 0 when the weights sum to 0 (no NaN, no gradient)."""
    values = torch.where(weights > 0, values, torch.zeros_like(values))  # also drops NaN/inf of masked entries
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def resize_nearest(target: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour resize of a B x C x h x w target to `size` = (h', w') (no-op when already that size)."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    return F.interpolate(target.float(), size=size, mode="nearest")


def match_size(prediction: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """A B x C x h x w prediction bilinearly resized to the target's `size` (h, w), for metrics.

    The pipeline makes targets at the first feature-map size, which is the prediction size; resize only if a caller
    chose another target size, so the comparison is still made pixel for pixel.
    """
    if tuple(prediction.shape[-2:]) == tuple(size):
        return prediction
    return F.interpolate(prediction.float(), size=size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class MapGrid:
    """Where one sample's target maps are read (rock_dist.data.transforms): the stored-map row and column indices
    (int64 h and w) of the nearest pixel centres of the crop, the columns already mirrored by a flip, and the
    sample's `geom` (its crop, flip and zoom)."""

    rows: torch.Tensor
    cols: torch.Tensor
    geom: Geometry

    def gather(self, stored: torch.Tensor) -> torch.Tensor:
        """The C x h x w samples of a stored C x H x W map."""
        # Gathering only h*w pixels is what makes full-resolution maps cheap: no full-size resize or flip.
        return stored[:, self.rows[:, None], self.cols[None, :]]


@dataclass(frozen=True)
class BatchGrid:
    """The batched `MapGrid` of rock_dist.data.device_augment: the batch index (B x 1 x 1), rows (B x h x 1) and
    columns (B x 1 x w) of the stored (zero-padded) maps on the host, the same on the training `device`, and each
    sample's geometry; `size` is the target size (h, w)."""

    index: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    device_index: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    geoms: Sequence[Geometry]
    device: torch.device
    size: tuple[int, int]


class AuxTask(ABC):
    """One auxiliary task. `name` is the model's output key, the batch key of its target, and the suffix of its
    loss (`loss_<name>`) and adaptive weight (`weight_<name>`) in the training logs."""

    name: str
    # Batch keys (docs/data_format.md): the presence flag (bool B: the sample has the target) and the target's keys.
    presence_key: str
    target_keys: tuple[str, ...]
    # The fixed weight of the task's loss in the total loss (the reference's; docs/losses.md).
    reference_weight: float
    # Aggregated evaluation metrics: key -> description (console table, README, docs/evaluation.md).
    metric_names: Mapping[str, str]
    # Key of this task's entry in a per-image evaluation record (rock_dist.engine.metrics).
    record_key: str

    # Data side (docs/data_pipeline.md). `target_kind`: "label" (one value per image, untouched by the geometry: the
    # batch key is the field of the same name, collated as `label_dtype`), "map" (dense maps sampled at the target
    # size following the crop, flip and zoom) or None (the task has no data side: its batch keys come from
    # elsewhere). `decoded_fields`: the fields `decode` adds to a decoded sample, with their value when the sample
    # lacks the task's members. `raw_keys` (maps): decoded field -> batch key under which an undecoded-geometry
    # batch (`--augment_on device`) ships it, zero-padded to the batch's largest size.
    target_kind: Literal["label", "map"] | None = None
    decoded_fields: Mapping[str, Any] = {}
    label_dtype: torch.dtype = torch.int64
    raw_keys: Mapping[str, str] = {}

    # ------------------------------------------------------------------------------------------------- weight
    def weight(self, loss_config: LossConfig) -> float:
        """The fixed weight: `loss_config.<name>_weight` where the configuration has that field, else the
        task's own reference weight (a task added without a configuration field)."""
        return float(getattr(loss_config, f"{self.name}_weight", self.reference_weight))

    # --------------------------------------------------------------------------------------------------- head
    @abstractmethod
    def channels(self, num_scenes: int) -> int:
        """Channels C_t of the task map of this task's ROCK branch (docs/architecture.md)."""

    @abstractmethod
    def predict(self, task_map: torch.Tensor) -> torch.Tensor:
        """The prediction pooled from the B x C_t x h x w task map (the model's output `outputs[name]`)."""

    # ---------------------------------------------------------------------------------------------------- loss
    @abstractmethod
    def loss(self, prediction: torch.Tensor, batch: Batch, config: ModelConfig) -> torch.Tensor:
        """The UNweighted loss of a batch: a masked mean over what `count` counts (exactly 0 when that is 0)."""

    @abstractmethod
    def count(self, batch: Batch) -> torch.Tensor | int:
        """How many items the loss of `batch` averages over (0 when the batch lacks the task's keys); summed over
        micro-batches and ranks it normalises the loss over the global batch (rock_dist.engine.normalization)."""

    # ------------------------------------------------------------------------------------------------- metrics
    @abstractmethod
    def image_stats(self, prediction: torch.Tensor, batch: Batch) -> list[Any]:
        """Per image of the batch, a small CPU record of sufficient statistics (None where the image has no
        target): pooling the records of any split of the images gives the same metrics (docs/evaluation.md)."""

    @abstractmethod
    def aggregate(self, records: Sequence[Any]) -> dict[str, float | int]:
        """The metrics (keys of `metric_names`, plus a count) of the non-None records, in image-id order."""

    def format_metric(self, key: str, value: float) -> str:
        """How the console's table shows metric `key` (a fraction by default)."""
        return f"{100 * value:.1f} %"

    # ------------------------------------------------------------------------------------------------ pictures
    @abstractmethod
    def pictures(self, prediction: torch.Tensor, batch: Batch, index: int, *, image: torch.Tensor,
                 scene_types: Sequence[str]) -> dict[str, torch.Tensor]:
        """TensorBoard pictures of image `index` (float32 predictions of the batch, ground truth in `batch`,
        `image` its uint8 3 x H x W network-size picture): name -> uint8 3 x h x w."""

    def original_picture(self, prediction: torch.Tensor, size: tuple[int, int], *, image: torch.Tensor,
                         scene_types: Sequence[str]) -> torch.Tensor | None:
        """The picture `rock_dist.detect` writes for one image's prediction (C x h x w, or C for a per-image one) at
        the image's original `size` (H, W), `image` its uint8 3 x H x W picture; None: the task draws none."""
        return None

    def describe(self, prediction: torch.Tensor, scene_types: Sequence[str]) -> dict[str, Any] | None:
        """What `rock_dist.detect` records in its JSON for one image's prediction (None: nothing); a `name` entry is
        also shown on the console."""
        return None

    # ----------------------------------------------------------------------------------------------- data side
    def decode(self, raw: Mapping[str, Any], size: tuple[int, int], loc: str) -> dict[str, Any]:
        """The task's fields (`decoded_fields`) of one shard sample: `raw` maps member suffixes to bytes, `size` is
        the image's (H, W), `loc` names the sample in errors (DataError). Default: the absent values (no members)."""
        return dict(self.decoded_fields)

    def present(self, fields: Mapping[str, Any]) -> bool:
        """Whether the decoded sample (its fields by name) has the task's target: the `presence_key` flag.
        Default: every decoded field is there."""
        return all(fields.get(name) is not None for name in self.decoded_fields)

    def synthetic_targets(self, batch_size: int, target_size: tuple[int, int], model_config: ModelConfig,
                          generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random targets (`target_keys` -> batched tensor, maps at `target_size`) of a batch where every sample
        has them, drawn from `generator` (rock_dist.engine.synthetic_batch: probes and tests without shards)."""
        raise NotImplementedError(f"task {self.name!r} draws no synthetic targets")

    def sample_maps(self, fields: Mapping[str, Any], grid: MapGrid) -> dict[str, torch.Tensor]:
        """Map tasks: the target maps (batch key -> C x h x w) of one sample read at `grid`, with the value changes
        the geometry implies (a flip mirrors the grid; what it does to the values, e.g. the sign of a horizontal
        component, is the task's), and their stand-ins (zeros) when the sample lacks the target."""
        raise NotImplementedError(f"task {self.name!r} has no dense target maps")

    def sample_maps_batched(self, batch: Mapping[str, Any], grid: BatchGrid) -> dict[str, torch.Tensor]:
        """Map tasks: `sample_maps` for a whole undecoded-geometry batch (its `raw_keys`, absent when no sample had
        the target) in the same float32 operations, so the values are bit-identical. A sample without the target is
        zero padding in the raw maps: its maps must still come out as `sample_maps`'s stand-ins (the presence flag
        is in `batch`)."""
        raise NotImplementedError(f"task {self.name!r} has no dense target maps")


__all__ = ["AuxTask", "Batch", "MapGrid", "BatchGrid", "masked_mean", "resize_nearest", "match_size"]
