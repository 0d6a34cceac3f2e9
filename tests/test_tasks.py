"""The auxiliary-task registry (rock_dist.tasks): the loss composed through it equals the previous hand-written
composition, and a fourth task registered in a test is picked up by the ROCK block, the criterion, the global
normalisation, the training step, task weighting, the metrics, the console and the pictures without other edits.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import pytest
import torch

from rock_dist.config import AUX_TASKS, LossConfig, ModelConfig
from rock_dist.data.batch import prepare_batch
from rock_dist.engine.console import format_losses
from rock_dist.engine.fast_path import Recipe
from rock_dist.engine.metrics import aggregate_aux_stats, aux_image_stats, aux_metric_names, format_aux_metric
from rock_dist.engine.normalization import count_keys, loss_ratios, micro_batch_counts, reference_weights
from rock_dist.engine.step import recipe_step_parts, train_step
from rock_dist.engine.synthetic_batch import synthetic_batch
from rock_dist.engine.task_weighting import build_task_weighting
from rock_dist.engine.tensorboard import prediction_pictures
from rock_dist.model.builder import build_criterion, build_model
from rock_dist.model.losses import compose_losses, depth_loss, detection_loss, normals_loss, scene_loss
from rock_dist.tasks import registry
from rock_dist.tasks.base import AuxTask, Batch, masked_mean

TINY = ModelConfig(backbone="resnet18", pretrained="none", image_size=(64, 64))

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest: Accelerate's singletons reset


class ConstantTask(AuxTask):
    """A toy task: predict a constant per-pixel map `toy` (B x 1 x h x w) for the samples with `has_toy`."""

    name, presence_key, target_keys, record_key = "toy", "has_toy", ("toy",), "toy_error"
    reference_weight, metric_names = 0.5, {"toy_mae": "toy mean absolute error"}

    def channels(self, num_scenes: int) -> int:
        return 4

    def predict(self, task_map: torch.Tensor) -> torch.Tensor:
        return task_map.mean(dim=1, keepdim=True)

    def loss(self, prediction: torch.Tensor, batch: Batch, config: ModelConfig) -> torch.Tensor:
        weights = batch["has_toy"].float()[:, None, None, None].expand_as(prediction)
        return masked_mean((prediction.float() - batch["toy"]).square(), weights)

    def count(self, batch: Batch) -> torch.Tensor | int:
        return batch["has_toy"].sum() if "has_toy" in batch else 0

    def image_stats(self, prediction: torch.Tensor, batch: Batch) -> list[Any]:
        errors = (prediction.float() - batch["toy"]).abs().flatten(1).mean(1).tolist()
        return [e if has else None for e, has in zip(errors, batch["has_toy"].tolist())]

    def aggregate(self, records: Sequence[Any]) -> dict[str, float | int]:
        return {"toy_mae": sum(records) / len(records), "num_toy": len(records)}

    def pictures(self, prediction: torch.Tensor, batch: Batch, index: int, *, image: torch.Tensor,
                 scene_types: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"toy": image.clone()}


@pytest.fixture
def toy() -> Iterator[ConstantTask]:
    task = registry.register(ConstantTask())
    try:
        yield task
    finally:
        registry.unregister(task.name)


def _toy_batch(config: ModelConfig, has_toy: list[bool], seed: int = 0) -> dict[str, Any]:
    batch = synthetic_batch(len(has_toy), config, seed=seed)
    h, w = batch["depth"].shape[-2:]
    batch["toy"] = torch.full((len(has_toy), 1, h, w), 0.25)
    batch["has_toy"] = torch.tensor(has_toy)
    return batch


def test_the_registry_matches_the_configuration() -> None:
    # config.AUX_TASKS repeats the built-in names for the torch-free command line: they must agree, and the
    # LossConfig's weight fields must be the tasks' reference weights (docs/losses.md: 3 / 3 / 30).
    assert registry.names() == AUX_TASKS == ("scene", "depth", "normals")
    assert reference_weights(LossConfig()) == {t.name: t.reference_weight for t in registry.all_tasks()} \
        == {"scene": 3.0, "depth": 3.0, "normals": 30.0}
    assert reference_weights(LossConfig(normals_weight=7.0))["normals"] == 7.0
    assert count_keys() == ("det", "scene", "depth", "normals")
    with pytest.raises(KeyError, match="registered: scene depth normals"):
        registry.get("toy")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("depth"))


def test_the_registry_composition_equals_the_hand_written_one() -> None:
    """The criterion's total is, bit for bit, loss_det + 3 scene + 3 depth + 30 normals computed by the loss
    functions directly (the composition before the registry), and with ratios and adaptive weights it is the
    former normalisation's (L_det r_det) + Σ w_t (L_t r_t)."""
    torch.manual_seed(0)
    model, criterion = build_model(TINY).train(), build_criterion(TINY, LossConfig())
    batch = prepare_batch(synthetic_batch(2, TINY), "cpu")
    batch["has_depth"] = torch.tensor([True, False])  # a missing modality takes part too
    outputs = model(batch["images"])
    got = criterion(outputs, batch)

    loss_loc, loss_conf, num_pos = detection_loss(outputs["loc"], outputs["conf"], batch["boxes"], batch["labels"],
                                                  criterion.priors)
    loss_det = 6.0 * loss_loc + loss_conf
    parts = {"scene": scene_loss(outputs["scene"], batch["scene"], batch["has_scene"]),
             "depth": depth_loss(outputs["depth"], batch["depth"], batch["has_depth"]),
             "normals": normals_loss(outputs["normals"], batch["normals"], batch["normals_mask"],
                                     batch["has_normals"])}
    expected = loss_det + 3.0 * parts["scene"] + 3.0 * parts["depth"] + 30.0 * parts["normals"]
    assert torch.equal(got["loss"], expected) and torch.equal(got["num_pos"], num_pos)
    assert torch.equal(got["loss_det"], loss_det)
    assert all(torch.equal(got[f"loss_{t}"], v) for t, v in parts.items())

    ratios = {"det": 1.0, "scene": 0.5, "depth": 2.0, "normals": 1.25}
    weights = {"scene": 1.0, "depth": 2.0, "normals": 4.0}
    scaled = criterion(outputs, batch, ratios, weights)
    expected = loss_det * 1.0 + sum(weights[t] * (parts[t] * ratios[t]) for t in parts)
    torch.testing.assert_close(scaled["loss"], expected, rtol=1e-6, atol=0)
    assert torch.equal(scaled["loss_depth"], parts["depth"] * 2.0)
    assert compose_losses(got, TINY.tasks, criterion.weight_dict)["loss"].equal(got["loss"])


def test_a_registered_fourth_task_is_trained_counted_weighted_measured_and_drawn(toy: ConstantTask) -> None:
    config = ModelConfig(backbone="resnet18", pretrained="none", image_size=(64, 64),
                         aux_tasks=("normals", "toy", "scene", "depth"))
    assert config.tasks == ("scene", "depth", "normals", "toy")
    torch.manual_seed(0)
    model, criterion = build_model(config).train(), build_criterion(config, LossConfig())
    assert model.rock.branches["toy"].task_map.out_channels == 4  # the head the task declares
    assert criterion.weight_dict["toy"] == 0.5

    # Criterion: the toy loss is a term of the total, with its weight; a batch without toy targets gives 0.
    raw = _toy_batch(config, [True, False])
    batch = prepare_batch(raw, "cpu")
    assert torch.equal(batch["toy"], raw["toy"])  # prepare_batch carries the task's keys as they are
    outputs = model(batch["images"])
    losses = criterion(outputs, batch)
    assert losses["loss_toy"] > 0
    rest = losses["loss_det"] + sum(w * losses[f"loss_{t}"] for t, w in (("scene", 3.0), ("depth", 3.0),
                                                                          ("normals", 30.0)))
    torch.testing.assert_close(losses["loss"], rest + 0.5 * losses["loss_toy"], rtol=1e-6, atol=0)
    none = criterion(outputs, {**batch, "has_toy": torch.tensor([False, False])})
    assert none["loss_toy"] == 0

    # Global normalisation: the toy count joins the count vector and gets its ratio.
    counts = micro_batch_counts(raw)
    assert count_keys()[-1] == "toy" and counts[-1] == 1
    assert loss_ratios(counts, counts * 2, 2)["toy"] == 1.0
    assert reference_weights(LossConfig())["toy"] == 0.5

    # Metrics, console and pictures.
    records = aux_image_stats(outputs, batch, config.tasks)
    assert records[0]["toy_error"] is not None and records[1]["toy_error"] is None
    metrics = aggregate_aux_stats(records)
    assert metrics["num_toy"] == 1 and "normals_mean" in metrics
    assert list(aux_metric_names())[-1] == "toy_mae" and format_aux_metric("toy_mae", 0.5) == "50.0 %"
    assert format_losses({"loss_toy": 1.0, "loss_scene": 2.0, "loss": 3.0}) == "loss 3 scene 2 toy 1"
    pictures = prediction_pictures(model, raw["images"], batch["images"], batch, class_names=["bg"] * 20,
                                   scene_types=["room"] * 27, loss_config=LossConfig(), max_images=2)
    assert pictures["toy"].shape[0] == 3 and "depth_pred" in pictures


def test_the_training_step_and_task_weighting_take_a_registered_task(toy: ConstantTask) -> None:
    config = ModelConfig(backbone="resnet18", pretrained="none", image_size=(64, 64),
                         aux_tasks=("scene", "depth", "normals", "toy"))
    torch.manual_seed(0)
    parts = recipe_step_parts(config, LossConfig(), Recipe(name="cpu", fused_adam=False, device_matching=True),
                              "cpu")
    assert parts.tasks == ("scene", "depth", "normals", "toy")
    parts.weighting = build_task_weighting("uncertainty", parts.tasks, reference_weights(LossConfig()))
    values = train_step(parts, [_toy_batch(config, [True, True])], step=1)
    assert values["loss_toy"] > 0 and values["weight_toy"] == pytest.approx(0.5)
    before = parts.weighting.weights()["toy"]
    # A step whose global batch has no toy target leaves the toy weight as it was (missing-modality rule).
    values = train_step(parts, [_toy_batch(config, [False, False], seed=1)], step=2)
    assert values["loss_toy"] == 0 and parts.weighting.weights()["toy"] == before
    assert parts.weighting.weights()["scene"] != pytest.approx(3.0)  # the present tasks did adapt
