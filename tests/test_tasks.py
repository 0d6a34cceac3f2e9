"""The auxiliary-task registry (rock_dist.tasks): the loss composed through it equals the previous hand-written
composition, and a fourth task registered in a test is picked up by the ROCK block, the criterion, the global
normalisation, the training step, task weighting, the metrics, the console and the pictures without other edits, and
by the data side: its shard member decoded, its dense map sampled and flipped by the training transform and by the
batched device augmentation, collated, and drawn in synthetic batches. Its torch-free catalog entry
(rock_dist.tasks.catalog) is picked up by the shard side: the manifest's modalities, the shard check of its member
and its layout.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from typing import Any, Iterator, Mapping, Sequence

import pytest
import torch
from torchvision.io import encode_png

from rock_dist.config import AUX_TASKS, DetectConfig, LossConfig, ModelConfig
from rock_dist.data.batch import collate, prepare_batch
from rock_dist.data.device_augment import BatchAugment
from rock_dist.data.members import aux_member, quiet_torchvision_io
from rock_dist.data.npy_member import encode_npy
from rock_dist.data.transforms import EvalTransform, TrainTransform, decode_sample
from rock_dist.engine.console import format_losses
from rock_dist.errors import DataError
from rock_dist.engine.fast_path import Recipe
from rock_dist.engine.metrics import aggregate_aux_stats, aux_image_stats, aux_metric_names, format_aux_metric
from rock_dist.engine.normalization import count_keys, loss_ratios, micro_batch_counts, reference_weights
from rock_dist.engine.step import recipe_step_parts, train_step
from rock_dist.engine.synthetic_batch import synthetic_batch
from rock_dist.engine.task_weighting import build_task_weighting
from rock_dist.engine.tensorboard import prediction_pictures
from rock_dist.model.builder import build_criterion, build_model
from rock_dist.model.losses import compose_losses, depth_loss, detection_loss, normals_loss, scene_loss
from rock_dist.shardbuild.shard_writer import check_sample, known_exts, modalities_of
from rock_dist.tasks import catalog, registry
from rock_dist.tasks.base import AuxTask, Batch, BatchGrid, MapGrid, masked_mean

TINY = ModelConfig(backbone="resnet18", pretrained="none", image_size=(64, 64))

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest: Accelerate's singletons reset


class ConstantTask(AuxTask):
    """A toy task: predict a per-pixel map `toy` (B x 1 x h x w) for the samples with `has_toy`. Its data side: a
    shard member `toy.npy` (uint8 1 x H x W, decoded to the field `toy_map`), read as the signed horizontal quantity
    (v - 128) / 128, so that a horizontal flip mirrors the map and negates its values (like the normals' x)."""

    name, presence_key, target_keys, record_key = "toy", "has_toy", ("toy",), "toy_error"
    reference_weight, metric_names = 0.5, {"toy_mae": "toy mean absolute error"}
    target_kind = "map"
    decoded_fields = {"toy_map": None}
    raw_keys = {"toy_map": "raw_toy"}

    def decode(self, raw: Mapping[str, Any], size: tuple[int, int], loc: str) -> dict[str, Any]:
        return {"toy_map": aux_member(raw, "toy", loc)}

    def synthetic_targets(self, batch_size: int, target_size: tuple[int, int], model_config: ModelConfig,
                          generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"toy": torch.full((batch_size, 1, *target_size), 0.25)}

    def sample_maps(self, fields: Mapping[str, Any], grid: MapGrid) -> dict[str, torch.Tensor]:
        if fields["toy_map"] is None:
            return {"toy": torch.zeros(1, len(grid.rows), len(grid.cols))}
        sign = -1.0 if grid.geom.flip else 1.0
        return {"toy": (grid.gather(fields["toy_map"]).float() - 128.0) * (sign / 128.0)}

    def sample_maps_batched(self, batch: Mapping[str, Any], grid: BatchGrid) -> dict[str, torch.Tensor]:
        if "raw_toy" not in batch:
            return {"toy": torch.zeros(len(grid.geoms), 1, *grid.size)}
        bi, rows, cols = grid.index
        # A sample without the member is zero padding in `raw_toy`: its map must be the per-sample stand-in, 0.
        sign = torch.tensor([-1.0 if g.flip else 1.0 for g in grid.geoms]) * batch["has_toy"]
        sign = sign[:, None, None]
        return {"toy": ((batch["raw_toy"][bi, 0, rows, cols].float() - 128.0) * (sign / 128.0)).unsqueeze(1)}

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


# The toy task's static facts: one dense uint8 member `toy.png` / `toy.npy`.
TOY_SPEC = catalog.TaskSpec("toy", "tests.test_tasks:ConstantTask",
                            maps=(catalog.MapMember("toy", "uint8", 1, ("L",)),))


@pytest.fixture
def toy() -> Iterator[ConstantTask]:
    catalog.register(TOY_SPEC)
    task = registry.register(ConstantTask())
    try:
        yield task
    finally:
        registry.unregister(task.name)
        catalog.unregister(TOY_SPEC.name)


def _toy_batch(config: ModelConfig, has_toy: list[bool], seed: int = 0) -> dict[str, Any]:
    batch = synthetic_batch(len(has_toy), config, seed=seed)
    h, w = batch["depth"].shape[-2:]
    batch["toy"] = torch.full((len(has_toy), 1, h, w), 0.25)
    batch["has_toy"] = torch.tensor(has_toy)
    return batch


def test_the_registry_matches_the_configuration() -> None:
    # config.AUX_TASKS and the registry both come from the catalog: they must agree, and the
    # LossConfig's weight fields must be the tasks' reference weights (docs/losses.md: 3 / 3 / 30).
    assert registry.names() == AUX_TASKS == catalog.builtin_names() == ("scene", "depth", "normals")
    # DetectConfig's per-task picture flags are written out (a typed dataclass): one per built-in task.
    assert {f"{t}_output_path" for t in AUX_TASKS} <= {f.name for f in dataclasses.fields(DetectConfig)}
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


def _raw_sample(index: int, toy_map: torch.Tensor | None) -> dict[str, Any]:
    """The members of one shard sample (12 x 16 PNG image, one box), with a `toy.npy` member when `toy_map`."""
    with quiet_torchvision_io():
        png = encode_png(torch.full((3, 12, 16), 90, dtype=torch.uint8)).numpy().tobytes()
    raw: dict[str, Any] = {"__key__": f"s{index}", "rgb.png": png,
                           "json": json.dumps({"image_id": index, "height": 12, "width": 16,
                                               "boxes": [[2, 2, 9, 8]], "labels": [1]}).encode()}
    if toy_map is not None:
        raw["toy.npy"] = encode_npy(toy_map.numpy())
    return raw


def test_a_registered_task_s_catalog_entry_drives_the_shard_side(toy: ConstantTask) -> None:
    """The torch-free side reads the catalog: the manifest counts the toy modality (after the dense maps, before the
    scene label), the shard check knows, checks and counts its member, and the reader decodes it with its layout."""
    assert catalog.modalities() == ("rgb", "depth", "normals", "toy", "scene")
    assert {"toy.png", "toy.npy"} <= known_exts()
    members = {k: v for k, v in _raw_sample(4, torch.full((1, 12, 16), 7, dtype=torch.uint8)).items() if k != "__key__"}
    facts, problems = check_sample("nyuv2_0004", members)
    assert problems == [] and facts["modalities"] == {"rgb", "toy"} == modalities_of(members)
    wrong = {**members, "toy.npy": encode_npy(torch.zeros(3, 12, 16, dtype=torch.uint8).numpy())}
    facts, problems = check_sample("nyuv2_0004", wrong)
    assert "toy" not in facts["modalities"] and len(problems) == 1 and problems[0].startswith("nyuv2_0004.toy.npy:")
    with pytest.raises(DataError, match="toy.npy must be"):
        aux_member(wrong, "toy", "s4")
    catalog.unregister("toy")
    try:  # without its entry the member is unknown to the shard check
        assert any("toy.npy: unknown member" in p for p in check_sample("nyuv2_0004", members)[1])
    finally:
        catalog.register(TOY_SPEC)
    with pytest.raises(ValueError, match="built-in task"):
        catalog.unregister("depth")


def test_the_catalog_side_imports_no_torch() -> None:
    """The command line, the manifest, the shard writer and the catalog load without torch (--help stays fast)."""
    code = ("import sys, rock_dist.config, rock_dist.data.manifest, rock_dist.shardbuild.shard_writer, "
            "rock_dist.tasks.catalog; assert 'torch' not in sys.modules, 'torch imported'")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_a_registered_task_s_map_is_decoded_sampled_flipped_and_collated(toy: ConstantTask) -> None:
    """The toy member is decoded by the task, sampled at the target size by the transforms, mirrored and negated by
    a flip, collated with its presence flag, and the batched device step gives the workers' values."""
    toy_map = (100 + 10 * torch.arange(16, dtype=torch.uint8)).expand(1, 12, 16).contiguous()  # a left-right ramp
    with_toy, without = decode_sample(_raw_sample(0, toy_map)), decode_sample(_raw_sample(1, None))
    assert torch.equal(with_toy.toy_map, toy_map) and without.toy_map is None

    # Centre sampling of 16 columns at 4: columns 2, 6, 10, 14 hold 120, 160, 200, 240.
    plain = EvalTransform((12, 16), (3, 4))(with_toy)["toy"]
    assert torch.equal(plain, torch.tensor([-8.0, 32.0, 72.0, 112.0]).expand(1, 3, 4) / 128)
    flip = TrainTransform((12, 16), (3, 4), no_crops=True, flip_p=1.0, jitter="none")
    flipped = flip(with_toy, random.Random(0))
    assert torch.equal(flipped["toy"], -plain.flip(-1)) and flipped["has_toy"]

    batch = collate([flipped, flip(without, random.Random(1))])
    assert batch["has_toy"].tolist() == [True, False]
    assert torch.equal(batch["toy"][0], flipped["toy"]) and not batch["toy"][1].any()

    # Random crops and flips: the device step, from the same draws, gives the workers' maps bit for bit.
    samples = [with_toy, without, with_toy, with_toy]
    workers = TrainTransform((12, 16), (3, 4), jitter="none")
    device = TrainTransform((12, 16), (3, 4), jitter="none", defer_augment=True)
    wb = collate([workers(s, random.Random(i)) for i, s in enumerate(samples)])
    db = collate([device(s, random.Random(i)) for i, s in enumerate(samples)])
    assert db["raw_toy"].shape == (4, 1, 12, 16) and "toy" not in db
    out = BatchAugment("cpu", (12, 16), (3, 4))(db)
    assert "raw_toy" not in out and torch.equal(out["toy"], wb["toy"])
    assert torch.equal(out["has_toy"], wb["has_toy"]) and wb["toy"][[0, 2, 3]].abs().sum() > 0

    synthetic = synthetic_batch(2, TINY)  # the task draws its own synthetic targets
    assert synthetic["has_toy"].all() and synthetic["toy"].shape == synthetic["depth"].shape


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
