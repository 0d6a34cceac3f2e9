"""The contract of one auxiliary task of the ROCK block: what each module of rock_dist.tasks declares.

An `AuxTask` says, in one place, everything the rest of the package needs about its task (docs/architecture.md,
"Auxiliary tasks"): the batch keys of its target and of its presence flags, the head of its ROCK branch (`channels`
of the task map and `predict`, which pools that map into the prediction), its `loss` on a batch, the `count` of
items that loss averages over (what the global normalisation all-reduces), its fixed weight in the total loss
(docs/losses.md), its evaluation metrics (`image_stats` per image, `aggregate` over the evaluated set), and its
TensorBoard `pictures`. Consumers (rock_dist.model.rock_block, rock_dist.model.losses, rock_dist.engine.normalization,
rock_dist.engine.metrics, rock_dist.engine.tensorboard) take the tasks from rock_dist.tasks.registry.

Also the masked-mean helpers every task loss shares.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from rock_dist.config import LossConfig, ModelConfig

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


__all__ = ["AuxTask", "Batch", "masked_mean", "resize_nearest", "match_size"]
