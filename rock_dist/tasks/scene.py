"""The scene-classification task of the ROCK block: one scene type per image (docs/losses.md, docs/evaluation.md).

Registered in rock_dist.tasks.registry. Shard member `scene.cls` (the scene id as ASCII, docs/data_format.md), decoded
to the field `scene` (-1 without it). Batch: `scene` int64 B (the scene id, -1 when unknown) and `has_scene` bool B, a
per-image label the augmentation leaves alone. Head: the spatial mean of an S-channel task map (S = number of scene
types), log-softmax. Loss: NLL, mean over the samples with a scene; weight 3. Metric: top-1 accuracy over images with a
scene label.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from rock_dist.errors import DataError
from rock_dist.tasks.base import AuxTask, Batch, masked_mean

if TYPE_CHECKING:
    from rock_dist.config import ModelConfig


def scene_loss(log_probs: torch.Tensor, scene: torch.Tensor, has_scene: torch.Tensor) -> torch.Tensor:
    """NLL of the scene log-probabilities B x S against ids B (-1 if missing), mean over samples that have one."""
    valid = has_scene.bool() & (scene >= 0)
    nll = -log_probs.float().gather(1, scene.clamp(min=0)[:, None]).squeeze(1)
    return masked_mean(nll, valid.float())


class SceneTask(AuxTask):
    name = "scene"
    presence_key = "has_scene"
    target_keys = ("scene",)
    reference_weight = 3.0
    metric_names = {"scene_accuracy": "scene top-1 accuracy"}
    record_key = "scene_correct"
    target_kind = "label"
    decoded_fields = {"scene": -1}

    def channels(self, num_scenes: int) -> int:
        return num_scenes

    def predict(self, task_map: torch.Tensor) -> torch.Tensor:
        # Pool and normalise in at least float32 (not bf16/fp16 under autocast); float64 stays float64.
        pooled = task_map.to(torch.promote_types(task_map.dtype, torch.float32)).mean(dim=(2, 3))
        return F.log_softmax(pooled, dim=1)

    def loss(self, prediction: torch.Tensor, batch: Batch, config: ModelConfig) -> torch.Tensor:
        return scene_loss(prediction, batch["scene"], batch["has_scene"])

    def count(self, batch: Batch) -> torch.Tensor | int:
        return (batch["has_scene"].bool() & (batch["scene"] >= 0)).sum() if "has_scene" in batch else 0

    def image_stats(self, prediction: torch.Tensor, batch: Batch) -> list[Any]:
        predicted = prediction.argmax(dim=1)
        target = batch["scene"].to(predicted.device)
        has = batch["has_scene"].to(predicted.device).bool() & (target >= 0)
        correct = (predicted == target).cpu().tolist()
        return [bool(ok) if present else None for ok, present in zip(correct, has.cpu().tolist())]

    def aggregate(self, records: Sequence[Any]) -> dict[str, float | int]:
        return {"scene_accuracy": sum(records) / len(records), "num_scene": len(records)}

    def pictures(self, prediction: torch.Tensor, batch: Batch, index: int, *, image: torch.Tensor,
                 scene_types: Sequence[str]) -> dict[str, torch.Tensor]:
        from rock_dist.engine.visualize import scene_picture

        probs = prediction[index].exp()  # log-probabilities
        k = int(probs.argmax())
        name = scene_types[k] if k < len(scene_types) else str(k)
        return {"scene": scene_picture(image, name, float(probs[k]))}

    def describe(self, prediction: torch.Tensor, scene_types: Sequence[str]) -> dict[str, Any] | None:
        score, scene = (float(v) for v in prediction.float().exp().max(dim=0))
        name = scene_types[int(scene)] if int(scene) < len(scene_types) else str(int(scene))
        return {"id": int(scene), "name": name, "score": score}

    def original_picture(self, prediction: torch.Tensor, size: tuple[int, int], *, image: torch.Tensor,
                         scene_types: Sequence[str]) -> torch.Tensor | None:
        from rock_dist.engine.visualize import scene_picture

        info = self.describe(prediction, scene_types)
        assert info is not None
        return scene_picture(image, info["name"], info["score"])

    def decode(self, raw: Mapping[str, Any], size: tuple[int, int], loc: str) -> dict[str, Any]:
        scene = -1
        if "scene.cls" in raw:
            scene = int(bytes(raw["scene.cls"]).decode("ascii").strip())
            if scene < 0:
                raise DataError(f"{loc}: scene.cls must be a non-negative scene id, got {scene}")
        return {"scene": scene}

    def synthetic_targets(self, batch_size: int, target_size: tuple[int, int], model_config: ModelConfig,
                          generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"scene": torch.randint(0, model_config.num_scenes, (batch_size,), generator=generator)}

    def present(self, fields: Mapping[str, Any]) -> bool:
        return fields["scene"] >= 0


SCENE = SceneTask()

__all__ = ["SCENE", "SceneTask", "scene_loss"]
