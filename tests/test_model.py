"""The detector (rock_dist.model): shapes, parameter counts, frozen BatchNorm, weights, decoding, BN folding."""

from __future__ import annotations

import copy
import hashlib
import io
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from torch import nn

from rock_dist.config import LossConfig, ModelConfig
from rock_dist.errors import ConfigError
from rock_dist.model import backbone as backbone_mod
from rock_dist.model import postprocess as postprocess_mod
from rock_dist.model.builder import build_criterion, build_model
from rock_dist.model.fuse import fold_all_batchnorm, fold_backbone_batchnorm, unfolded_state_dict
from rock_dist.model.postprocess import postprocess_detections
from rock_dist.model.priors import feature_map_sizes, num_priors

from numerics import assert_equivalent, to_float64

SMALL = (128, 160)


def small_config(**kw) -> ModelConfig:
    return ModelConfig(**{"backbone": "resnet18", "pretrained": "none", "image_size": SMALL, **kw})


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("tasks,no_rock", [(("scene", "depth", "normals"), False), (("depth",), False),
                                           (("scene", "normals"), False), (("scene", "depth", "normals"), True)])
def test_output_shapes_and_no_unused_parameters(tasks: tuple[str, ...], no_rock: bool) -> None:
    torch.manual_seed(0)
    cfg = small_config(aux_tasks=tasks, no_rock=no_rock, num_classes=7, num_scenes=5)
    model = build_model(cfg)
    out = model(torch.randn(2, 3, *SMALL))
    P = num_priors(SMALL)
    h, w = feature_map_sizes(SMALL)[0]
    expected = {"loc": (2, P, 4), "conf": (2, P, 7)}
    if not no_rock:
        expected.update({"scene": (2, 5), "depth": (2, 1, h, w), "normals": (2, 3, h, w)})
        expected = {k: v for k, v in expected.items() if k in ("loc", "conf") or k in tasks}
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert model.priors.shape == (P, 4) and "priors" not in model.state_dict()
    assert model.tasks == (() if no_rock else tuple(t for t in ("scene", "depth", "normals") if t in tasks))
    if "scene" in out:
        torch.testing.assert_close(out["scene"].exp().sum(dim=1), torch.ones(2))
    # Every parameter gets a gradient: the branches of untrained tasks are not built (DDP needs no
    # find_unused_parameters).
    sum(v.float().mean() for v in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert (model.rock is None) == no_rock
    if model.rock is not None:
        assert set(model.rock.branches) == set(tasks)


@pytest.mark.parametrize("size", [(64, 64), (96, 200), (200, 96), (128, 160)])
def test_feature_maps_match_pure_python_geometry(size: tuple[int, int]) -> None:
    model = build_model(small_config(image_size=size, no_rock=True)).eval()
    shapes: list[tuple[int, int]] = []
    hooks = [head.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape[-2:])))
             for head in model.head.loc]
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    for h in hooks:
        h.remove()
    assert shapes == feature_map_sizes(size)
    assert out["loc"].shape[1] == num_priors(size) == model.priors.shape[0]


def test_parameter_counts_at_reference_settings() -> None:
    rock = build_model(ModelConfig(pretrained="none"))
    assert n_params(rock) == 49_327_531
    baseline = build_model(ModelConfig(pretrained="none", no_rock=True))
    assert n_params(baseline) == 41_948_560
    # Conf bias: background 0, every other class -log(99).
    bias = baseline.head.conf[0].bias.reshape(20, 4)
    assert torch.all(bias[0] == 0)
    torch.testing.assert_close(bias[1:], torch.full((19, 4), -torch.log(torch.tensor(99.0)).item()))
    assert all(m.momentum == 0.01 for m in rock.rock.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.momentum == 0.01 for m in rock.head.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_basic_block_backbones_are_dilated(name: str) -> None:
    model = build_model(small_config(backbone=name, no_rock=True))
    layer4 = model.backbone.layer4
    assert layer4[0].conv1.stride == (1, 1) and layer4[0].downsample[0].stride == (1, 1)
    assert all(b.conv1.dilation == (2, 2) and b.conv2.padding == (2, 2) for b in list(layer4)[1:])
    with torch.no_grad():
        assert model.backbone(torch.randn(1, 3, 96, 128)).shape == (1, 512, 6, 8)


def test_three_stage_trunk_and_light_extra_layers_keep_every_output_shape() -> None:
    reference = build_model(small_config())
    light = build_model(small_config(backbone_stages=3, extra_layers="light"))
    assert light.backbone.layer4 is None and light.backbone.out_channels == 256
    assert [m.out_channels for m in light.head.extra_layers[0] if isinstance(m, nn.Conv2d)] == [256, 512]
    assert [m.out_channels for m in reference.head.extra_layers[0] if isinstance(m, nn.Conv2d)] == [1024, 1024]
    # Same maps, priors and auxiliary targets as the reference network, with far fewer weights.
    assert torch.equal(light.priors, reference.priors)
    assert n_params(light) < 0.5 * n_params(reference)
    full_size = {"image_size": (480, 640)}  # the last extra layer's kernel depends on the input size
    assert n_params(build_model(small_config(backbone_stages=3, extra_layers="light", **full_size))) == 14_063_275
    assert n_params(build_model(small_config(**full_size))) == 32_464_811  # docs/architecture.md
    light.eval()
    with torch.no_grad():
        out = light(torch.randn(2, 3, *SMALL))
    h, w = feature_map_sizes(SMALL, "resnet18")[0]
    assert out["loc"].shape == (2, num_priors(SMALL, "resnet18"), 4) and out["depth"].shape == (2, 1, h, w)
    assert out["normals"].shape == (2, 3, h, w) and out["scene"].shape == (2, 27)
    assert light.config.describe() == ("resnet18 (3 stages, light extra layers), ROCK: scene depth normals, "
                                       "input 128x160")
    assert reference.config.describe().startswith("resnet18, ROCK")


def test_a_three_stage_trunk_loads_four_stage_weights_without_layer4(tmp_path: Path) -> None:
    src = build_model(small_config(no_rock=True))
    path = tmp_path / "resnet18.pt"
    torch.save({**src.backbone.state_dict(), "fc.weight": torch.zeros(1000, 512)}, path)
    model = build_model(small_config(backbone_stages=3, pretrained=str(path)))
    assert torch.equal(model.backbone.layer3[1].conv2.weight, src.backbone.layer3[1].conv2.weight)
    with pytest.raises(ConfigError, match="--backbone_stages 5"):
        build_model(small_config(backbone_stages=5))
    with pytest.raises(ConfigError, match="--extra_layers"):
        build_model(small_config(extra_layers="huge"))


# ---------------------------------------------------------------------------------------------- frozen BatchNorm
def test_backbone_batchnorm_stays_in_eval_mode() -> None:
    model = build_model(small_config())
    model.train()
    backbone_bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert backbone_bns and not any(m.training for m in backbone_bns)
    assert all(m.weight.requires_grad and m.bias.requires_grad for m in backbone_bns)
    assert all(m.training for m in model.rock.modules() if isinstance(m, nn.BatchNorm2d))
    before = [m.running_mean.clone() for m in backbone_bns]
    model(torch.randn(2, 3, *SMALL))["conf"].sum().backward()
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, backbone_bns))
    assert backbone_bns[0].weight.grad is not None  # affine weights still train
    model.eval()
    model.train(True)
    assert not any(m.training for m in backbone_bns)


# ------------------------------------------------------------------------------------------------ pretrained weights
def test_local_state_dict_weights(tmp_path: Path) -> None:
    src = build_model(small_config(no_rock=True))
    path = tmp_path / "r18.pt"
    state = {f"module.{k}": v for k, v in src.backbone.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 512)  # an ImageNet classifier is ignored
    torch.save(state, path)
    dst = build_model(small_config(no_rock=True, pretrained=str(path)))
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(v, dst.backbone.state_dict()[k])
    # A full rock_dist weights file works too (its backbone entries are used).
    torch.save({"format": "rock_dist-weights", "model": src.state_dict()}, tmp_path / "full.pt")
    again = build_model(small_config(pretrained=str(tmp_path / "full.pt")))
    assert torch.equal(again.backbone.conv1.weight, src.backbone.conv1.weight)


def test_bad_weight_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        build_model(small_config(pretrained=str(tmp_path / "missing.pt")))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pt"):
        build_model(small_config(pretrained=str(tmp_path / "junk.pt")))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="state dict"):
        build_model(small_config(pretrained=str(tmp_path / "list.pt")))
    r34 = build_model(small_config(backbone="resnet34", no_rock=True))
    torch.save(r34.backbone.state_dict(), tmp_path / "r34.pt")
    with pytest.raises(ConfigError, match="resnet18"):
        build_model(small_config(pretrained=str(tmp_path / "r34.pt")))


def test_imagenet_offline_is_a_config_error_quickly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    with pytest.raises(ConfigError, match="--pretrained none"):
        build_model(small_config(pretrained="imagenet"))

    # A connection that never answers must not hang: the deadline turns it into the same error.
    def hang(*args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(urllib.request, "urlopen", hang)
    monkeypatch.setattr(backbone_mod, "CONNECT_TIMEOUT_S", 0.3)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="--pretrained none"):
        build_model(small_config(pretrained="imagenet"))
    assert time.monotonic() - start < 10


def test_imagenet_weights_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    src = build_model(small_config(no_rock=True))
    cache = backbone_mod.imagenet_cache_path("resnet18")
    assert str(cache).startswith(str(tmp_path))
    cache.parent.mkdir(parents=True)
    torch.save({**src.backbone.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)},
               cache)
    model = build_model(small_config(pretrained="imagenet"))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, src.backbone.layer4[1].conv2.weight)


def test_imagenet_download_is_verified_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    src = build_model(small_config(no_rock=True))
    buffer = io.BytesIO()
    torch.save(src.backbone.state_dict(), buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(data))

    class Weights:  # what torchvision's weight enums expose: a URL whose file name carries the hash prefix
        url = f"https://example.invalid/resnet18-{digest[:8]}.pth"

    monkeypatch.setattr(backbone_mod, "_imagenet_weights", lambda name: Weights)
    model = build_model(small_config(pretrained="imagenet"))
    assert torch.equal(model.backbone.conv1.weight, src.backbone.conv1.weight)
    assert backbone_mod.imagenet_cache_path("resnet18").is_file()

    Weights.url = "https://example.invalid/resnet18-00000000.pth"  # corrupted download: error, nothing cached
    with pytest.raises(ConfigError, match="checksum"):
        build_model(small_config(pretrained="imagenet"))
    assert not backbone_mod.imagenet_cache_path("resnet18").exists()


# ------------------------------------------------------------------------------------------------------ decoding
PP_PRIORS = torch.tensor([[0.30, 0.3, 0.2, 0.2], [0.32, 0.3, 0.2, 0.2], [0.70, 0.7, 0.2, 0.2],
                          [0.38, 0.3, 0.2, 0.2], [0.42, 0.3, 0.2, 0.2]])
# Class probabilities (background, class 1, class 2) per prior. IoU(p0, p1) = .82, IoU(p0, p3) = .43,
# IoU(p0, p4) = .25.
PP_PROBS = torch.tensor([[0.06, 0.90, 0.04], [0.16, 0.80, 0.04], [0.26, 0.04, 0.70], [0.44, 0.06, 0.50],
                         [0.36, 0.60, 0.04]])


def test_postprocess_thresholds_nms_and_cap() -> None:
    conf = PP_PROBS.log().expand(2, 5, 3).clone()
    loc = torch.zeros(2, 5, 4)
    loc[1, 0, 0] = 1.0  # image 1's first box moves right by 0.1 * 0.2 * 1 = 0.02
    outputs = {"loc": loc, "conf": conf}
    before = {k: v.clone() for k, v in outputs.items()}
    dets = postprocess_detections(loc, conf, PP_PRIORS, score_threshold=0.05, nms_iou=0.3, max_detections=100)
    assert all(torch.equal(before[k], outputs[k]) for k in outputs)  # the network's tensors are untouched
    assert len(dets) == 2
    # p1 (class 1) is suppressed by p0 (IoU .82); p3's class-1 score .06 is suppressed by p0 (IoU .43) but its
    # class-2 score survives (NMS is per class); p4 survives (IoU .25 < .3); scores <= .05 are dropped.
    torch.testing.assert_close(dets[0]["scores"], torch.tensor([0.9, 0.7, 0.6, 0.5]))
    assert dets[0]["labels"].tolist() == [1, 2, 1, 2]
    torch.testing.assert_close(dets[0]["boxes"], torch.tensor([[0.2, 0.2, 0.4, 0.4], [0.6, 0.6, 0.8, 0.8],
                                                               [0.32, 0.2, 0.52, 0.4], [0.28, 0.2, 0.48, 0.4]]))
    # Each image is decoded from its own offsets (the reference decoded all images with the first one's).
    torch.testing.assert_close(dets[1]["boxes"][0], torch.tensor([0.22, 0.2, 0.42, 0.4]))

    capped = postprocess_detections(loc, conf, PP_PRIORS, max_detections=3)
    assert [len(d["scores"]) for d in capped] == [3, 3]
    torch.testing.assert_close(capped[0]["scores"], torch.tensor([0.9, 0.7, 0.6]))
    strict = postprocess_detections(loc, conf, PP_PRIORS, score_threshold=0.65)
    torch.testing.assert_close(strict[0]["scores"], torch.tensor([0.9, 0.7]))
    loose = postprocess_detections(loc, conf, PP_PRIORS, nms_iou=0.9)  # no pair overlaps at IoU > .9
    torch.testing.assert_close(loose[0]["scores"], torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.06]))


def test_postprocess_chunked_nms_equals_single_call(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(small_config(no_rock=True)).eval()
    gen = torch.Generator().manual_seed(0)
    P = model.priors.shape[0]
    outputs = {"loc": torch.randn(3, P, 4, generator=gen) * 0.5, "conf": torch.randn(3, P, 20, generator=gen) * 3}
    full = model.postprocess(outputs)
    monkeypatch.setattr(postprocess_mod, "NMS_CHUNK", 500)
    chunked = model.postprocess(outputs)
    for a, b in zip(full, chunked):
        assert 0 < len(a["scores"]) <= 100
        assert torch.all(a["scores"][:-1] >= a["scores"][1:])
        assert a["boxes"].min() >= 0 and a["boxes"].max() <= 1
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(a[k], b[k])


# ----------------------------------------------------------------------------------------------- fast-path helpers
def _randomise_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def test_batchnorm_folding_is_equivalent() -> None:
    # Folding is exact algebra, so the comparison runs in float64 where only rounding separates the two paths
    # (tests/numerics.py derives the tolerance).
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = build_model(small_config())
    _randomise_batchnorm(model, gen)
    model, x = to_float64(model, torch.randn(2, 3, *SMALL, generator=gen))
    folded = fold_backbone_batchnorm(copy.deepcopy(model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.backbone.modules())
    for mode in (True, False):  # exact in training too: the backbone statistics are frozen
        model.train(mode)
        folded.train(mode)
        assert_equivalent(folded(x), model(x))
    # Saved in the unfolded layout, the weights load into a plain model and give the same function.
    plain = build_model(small_config()).double().eval()
    plain.load_state_dict(unfolded_state_dict(folded), strict=True)
    model.eval()
    with torch.no_grad():
        a, c = model(x), plain(x)
    assert_equivalent(c, a)

    # Inference: folding everything that follows a conv gives the same outputs too.
    everything = fold_all_batchnorm(copy.deepcopy(model))
    remaining = [m for m in everything.modules() if isinstance(m, nn.BatchNorm2d)]
    assert remaining == [everything.rock.fusion_bn]
    with torch.no_grad():
        assert_equivalent(everything(x), a)
    with pytest.raises(ValueError, match="eval"):
        fold_all_batchnorm(copy.deepcopy(model).train())


def test_channels_last_and_compile_friendly() -> None:
    torch.manual_seed(0)
    cfg = small_config()
    model = build_model(cfg).eval()
    criterion = build_criterion(cfg, LossConfig())
    x = torch.randn(2, 3, *SMALL)
    # The memory format changes only the summation order: compared in float64 (tests/numerics.py).
    model64, x64 = to_float64(copy.deepcopy(model), x.clone())
    with torch.no_grad():
        ref64 = model64(x64)
        cl = model64.to(memory_format=torch.channels_last)(x64.contiguous(memory_format=torch.channels_last))
    assert_equivalent(cl, ref64)
    with torch.no_grad():
        ref = model(x)
    # fullgraph=True fails on any graph break, i.e. on data-dependent Python control flow in forward / the loss.
    h, w = feature_map_sizes(SMALL)[0]
    batch = {"boxes": torch.tensor([[[0.1, 0.1, 0.5, 0.6]], [[0.0, 0.0, 0.0, 0.0]]]),
             "labels": torch.tensor([[3], [0]]),
             "scene": torch.tensor([1, -1]), "has_scene": torch.tensor([True, False]),
             "depth": torch.rand(2, 1, h, w) + 0.5, "has_depth": torch.tensor([True, True]),
             "normals": torch.nn.functional.normalize(torch.randn(2, 3, h, w), dim=1),
             "normals_mask": torch.ones(2, 1, h, w, dtype=torch.bool), "has_normals": torch.tensor([True, False])}
    compiled_model = torch.compile(model, backend="eager", fullgraph=True)
    compiled_loss = torch.compile(criterion, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled_model(x)
        losses = compiled_loss(out, batch)
        expected = criterion(ref, batch)
    # backend="eager" replays the same float32 kernels on the same inputs; only a reordered reduction over the
    # ~500 priors could differ, by ~500 * 2**-24 ≈ 3e-5 relative at worst, inside 1e-4.
    for k in expected:
        torch.testing.assert_close(losses[k], expected[k], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(losses["loss"]) and losses["num_pos"].item() >= 1


def test_backbone_bn_train_option_updates_statistics_and_refuses_folding() -> None:
    from rock_dist.errors import ConfigError
    from rock_dist.model.fuse import fold_backbone_batchnorm

    model = build_model(small_config(backbone_bn="train"))
    model.train()
    backbone_bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert backbone_bns and all(m.training for m in backbone_bns)
    before = backbone_bns[0].running_mean.clone()
    with torch.no_grad():
        model(torch.randn(2, 3, 128, 160) * 3 + 1)
    assert not torch.equal(before, backbone_bns[0].running_mean)
    with pytest.raises(ConfigError, match="backbone_bn frozen"):
        fold_backbone_batchnorm(model)
