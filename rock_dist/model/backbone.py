"""Dilated ResNet backbone with frozen BatchNorm statistics, and its pretrained weights.

Called by `builder.build_model`. The backbone is a torchvision ResNet (18, 34 or 50) whose last stage uses dilation
instead of stride (output stride 16: 480x640 → 30x40) and whose avgpool/fc are gone; with `stages=3` it ends after
layer3 instead (same output stride, half the channels, docs/architecture.md). Its BatchNorm layers always
run in eval mode — running statistics stay those of the pretrained weights, because the detection batches (8 per
GPU in the reference) are too small to estimate them — while their affine weights keep training.

Pretrained weights (`ModelConfig.pretrained`): 'imagenet' (torchvision's IMAGENET1K_V1, read from the torch hub
cache, else downloaded with short timeouts), 'none', or the path of a local state-dict file. Every failure is a
ConfigError that says what to pass instead; nothing here can hang.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import urllib.request
from pathlib import Path
from typing import Any, Mapping

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from rock_dist.config import BACKBONES
from rock_dist.errors import ConfigError
from rock_dist.fsutil import atomic_path

# Seconds allowed to open the connection (DNS + TCP + TLS + headers), and per read of the body afterwards.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 20.0

# Output channels of layer4 and of layer3 (the trunk's end with stages=3).
_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
_LAYER3_CHANNELS = {"resnet18": 256, "resnet34": 256, "resnet50": 1024}
STAGES = (3, 4)


class ResNetBackbone(nn.Module):
    """ResNet trunk: stem + layer1..layer4 (last stage dilated). Input B x 3 x H x W → B x C x ceil(H/16) x ceil(W/16).

    C = 2048 (resnet50) or 512 (resnet18/34). With `stages=3` there is no layer4 (`self.layer4` is None) and
    C = 1024 (resnet50) or 256 (resnet18/34): the map has the same size, because the dilated layer4 keeps the stride.
    Parameter names equal torchvision's (`conv1`, `bn1`, `layer1`, ...),
    so torchvision state dicts load directly. With `freeze_bn` (the reference's choice) BatchNorm layers stay in eval
    mode whatever `train()` is called with; without it they behave like any BatchNorm (training from scratch, where
    frozen initial statistics would leave the deep trunk unnormalised).
    """

    def __init__(self, name: str = "resnet50", freeze_bn: bool = True, stages: int = 4) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ConfigError(f"--backbone {name!r}: unknown backbone; choose one of {', '.join(BACKBONES)}")
        if stages not in STAGES:
            raise ConfigError(f"--backbone_stages {stages}: choose {' or '.join(map(str, STAGES))}")
        self.name = name
        self.out_channels = _CHANNELS[name] if stages == 4 else _LAYER3_CHANNELS[name]
        net = _make_dilated_resnet(name)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.layer4: nn.Module | None = net.layer4 if stages == 4 else None
        self.freeze_bn = freeze_bn
        if freeze_bn:
            self.freeze_batchnorm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x if self.layer4 is None else self.layer4(x)

    def freeze_batchnorm(self) -> None:
        """Put every BatchNorm in eval mode (running statistics frozen; affine weights still train)."""
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    def train(self, mode: bool = True) -> "ResNetBackbone":
        super().train(mode)
        if self.freeze_bn:
            self.freeze_batchnorm()
        return self


def _make_dilated_resnet(name: str) -> ResNet:
    """torchvision ResNet with stride 1 and dilation 2 in layer4 (random init)."""
    if name == "resnet50":
        return torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True])
    net = torchvision.models.resnet18(weights=None) if name == "resnet18" else torchvision.models.resnet34(weights=None)
    # torchvision's BasicBlock refuses dilation, so dilate layer4 by hand the way torchvision does for Bottleneck:
    # the first block keeps dilation 1 but loses its stride, the following blocks use dilation 2 (padding 2).
    # Weight shapes do not change, so ImageNet weights still load.
    first: BasicBlock = net.layer4[0]
    first.conv1.stride = (1, 1)
    assert first.downsample is not None
    first.downsample[0].stride = (1, 1)
    for block in list(net.layer4)[1:]:
        for conv in (block.conv1, block.conv2):
            conv.dilation, conv.padding = (2, 2), (2, 2)
    return net


# ------------------------------------------------------------------------------------------------ pretrained weights
def _imagenet_weights(name: str) -> torchvision.models.WeightsEnum:
    return {
        "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
        "resnet34": torchvision.models.ResNet34_Weights.IMAGENET1K_V1,
        "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    }[name]


def imagenet_cache_path(name: str) -> Path:
    """Where torch hub keeps (or would keep) the ImageNet weights of backbone `name`."""
    url = _imagenet_weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _offline_message(name: str, why: str) -> str:
    return (f"--pretrained imagenet: the ImageNet weights of {name} are not in the torch hub cache "
            f"({imagenet_cache_path(name)}) and could not be downloaded ({why}); pass --pretrained none to train "
            f"from scratch, or --pretrained PATH with a local {name} state-dict file")


def _download(url: str, dest: Path, name: str) -> None:
    """Download `url` to `dest` atomically; bounded in time; any failure → ConfigError."""
    result: dict[str, Any] = {}

    def _open() -> None:
        try:
            result["response"] = urllib.request.urlopen(url, timeout=READ_TIMEOUT_S)
        except BaseException as err:  # noqa: BLE001 - handed to the calling thread, which raises it below
            result["error"] = err

    # The socket timeout does not cover DNS resolution, so the whole connection step runs in a daemon thread with a
    # deadline; a stuck resolver cannot keep the process waiting.
    opener = threading.Thread(target=_open, daemon=True)
    opener.start()
    opener.join(CONNECT_TIMEOUT_S)
    if opener.is_alive():
        raise ConfigError(_offline_message(name, f"no connection within {CONNECT_TIMEOUT_S:.0f} s"))
    if "error" in result:
        raise ConfigError(_offline_message(name, f"{type(result['error']).__name__}: {result['error']}"))
    # torchvision names its files NAME-<first hex digits of the sha256>.pth; a mismatch means a broken download,
    # which must not be left in the cache (atomic_path only renames after this block succeeds).
    match = re.search(r"-([0-9a-f]{6,})\.", dest.name)
    try:
        with result["response"] as response, atomic_path(dest) as tmp:
            digest = hashlib.sha256()
            with open(tmp, "wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if match and not digest.hexdigest().startswith(match.group(1)):
                raise ValueError(f"checksum mismatch (sha256 {digest.hexdigest()[:12]}..., expected "
                                 f"{match.group(1)}...)")
    except Exception as err:  # network, file system, or checksum: any failure means "no weights"
        raise ConfigError(_offline_message(name, f"{type(err).__name__}: {err}")) from err


def _read_state_dict(path: Path, flag: str) -> dict[str, torch.Tensor]:
    """Load a state dict from `path` (weights_only); accepts a bare state dict, {'state_dict': ...} or a rock_dist
    weights/checkpoint file ({'model': ...}, whose `backbone.` entries are used)."""
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises assorted types on junk
        raise ConfigError(f"{flag} {path}: not a readable PyTorch state-dict file ({type(err).__name__}: {err})") \
            from err
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{flag} {path}: expected a state dict (a mapping of parameter names to tensors)")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if any(k.startswith("backbone.") for k in obj):
            if not key.startswith("backbone."):
                continue
            key = key[len("backbone."):]
        state[key] = value
    return state


def load_backbone_weights(backbone: ResNetBackbone, pretrained: str) -> None:
    """Load `pretrained` ('imagenet' | 'none' | path) into `backbone`; ConfigError on any problem."""
    if pretrained == "none":
        return
    if pretrained == "imagenet":
        path = imagenet_cache_path(backbone.name)
        if not path.is_file():
            _download(_imagenet_weights(backbone.name).url, path, backbone.name)
        flag = "--pretrained imagenet"
    else:
        path = Path(pretrained).expanduser()
        flag = "--pretrained"
    state = _read_state_dict(path, flag)
    # The ImageNet classifier is not part of the backbone, nor is layer4 in a three-stage trunk.
    dropped = ("fc.",) if backbone.layer4 is not None else ("fc.", "layer4.")
    state = {k: v for k, v in state.items() if not k.startswith(dropped)}
    own = backbone.state_dict()
    # Old torchvision files lack BatchNorm's num_batches_tracked; BatchNorm fills it in when loading.
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            details.append(f"{len(wrong)} of the wrong shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} "
                           f"vs {tuple(own[wrong[0]].shape)})")
        hint = "" if pretrained == "imagenet" else f"; the file must hold {backbone.name} weights"
        raise ConfigError(f"{flag} {path}: parameters do not fit the {backbone.name} backbone: "
                          f"{', '.join(details)}{hint}")
    backbone.load_state_dict(state, strict=False)  # completeness checked above


def build_backbone(name: str = "resnet50", pretrained: str = "none", freeze_bn: bool = True,
                   stages: int = 4) -> ResNetBackbone:
    """A dilated ResNet backbone (`stages` 4, or 3 without layer4) with weights from `pretrained`
    ('imagenet' | 'none' | path)."""
    backbone = ResNetBackbone(name, freeze_bn, stages)
    load_backbone_weights(backbone, pretrained)
    return backbone


__all__ = ["ResNetBackbone", "build_backbone", "STAGES", "load_backbone_weights", "imagenet_cache_path",
           "CONNECT_TIMEOUT_S", "READ_TIMEOUT_S"]
