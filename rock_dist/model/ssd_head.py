"""SSD detection head: 5 extra layers and the loc/conf prediction convolutions, docs/architecture.md.

Called by `detector.ROCKDetector` on the (ROCK-fused) backbone map. Six maps (the input and the outputs of the
extra layers) each get a 3x3 loc conv (A*4 channels) and a 3x3 conf conv (A*num_classes channels), A = 4,6,6,6,4,4
priors per location. Predictions are flattened in the prior order of `priors.make_priors` (map, prior size, row,
column); within a head's output, channel `k * A + a` is coordinate/class k of prior size a (the reference layout).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rock_dist.errors import ConfigError
from rock_dist.model.priors import PRIORS_PER_LOCATION, extra_layer_kernels
from rock_dist.model.rock_block import BN_MOMENTUM

# (mid channels, out channels) of the five extra layers, by `--extra_layers`. The reference's first layer is 1024
# wide (a 3x3 1024→1024 convolution: a fifth of a resnet18 training step at 128x160); 'light' takes NVIDIA's SSD300
# widths, whose first layer is 1x1 C→256 then 3x3 256→512.
EXTRA_WIDTHS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "reference": ((1024, 256, 128, 128, 128), (1024, 512, 256, 256, 256)),
    "light": ((256, 256, 128, 128, 128), (512, 512, 256, 256, 256)),
}
MID_CHANNELS, OUT_CHANNELS = EXTRA_WIDTHS["reference"]
# Foreground prior probability of the conf bias init (Focal Loss paper): bias = -log((1 - pi) / pi) = -log(99).
FOREGROUND_PRIOR = 0.01


class SSDHead(nn.Module):
    """forward(x B x C x h0 x w0) → (loc B x P x 4, conf B x P x num_classes).

    `image_size` only decides the kernels of the last two extra layers (see `priors.extra_layer_kernels`), so that
    the six maps match `priors.feature_map_sizes(image_size)`.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int],
                 backbone: str = "resnet50", extra_layers: str = "reference") -> None:
        super().__init__()
        if extra_layers not in EXTRA_WIDTHS:
            raise ConfigError(f"--extra_layers {extra_layers!r}: choose {' or '.join(EXTRA_WIDTHS)}")
        self.num_classes = num_classes
        mid_channels, out_channels = EXTRA_WIDTHS[extra_layers]
        k4, k5 = extra_layer_kernels(image_size, backbone)
        # (kernel, stride, padding) of the second conv of each extra layer.
        geometry: list[tuple[int | tuple[int, int], int, int]] = [
            (3, 2, 1), (3, 2, 1), (3, 2, 1), (k4, 1, 0), (k5, 1, 0)]
        channels = (in_channels,) + out_channels
        self.extra_layers = nn.ModuleList()
        for c_in, mid, c_out, (kernel, stride, padding) in zip(channels[:-1], mid_channels, out_channels, geometry):
            self.extra_layers.append(nn.Sequential(
                nn.Conv2d(c_in, mid, 1), nn.BatchNorm2d(mid, momentum=BN_MOMENTUM), nn.ReLU(inplace=True),
                nn.Conv2d(mid, c_out, kernel, stride=stride, padding=padding),
                nn.BatchNorm2d(c_out, momentum=BN_MOMENTUM), nn.ReLU(inplace=True)))
        self.loc = nn.ModuleList(nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(channels, PRIORS_PER_LOCATION))
        self.conf = nn.ModuleList(nn.Conv2d(c, a * num_classes, 3, padding=1)
                                  for c, a in zip(channels, PRIORS_PER_LOCATION))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal conv weights; conf bias 0 for background and -log(99) for the other classes."""
        for module in [*self.extra_layers, *self.loc, *self.conf]:
            for param in module.parameters():
                if param.dim() > 1:
                    nn.init.kaiming_normal_(param, nonlinearity="relu")
        fg_bias = -math.log((1 - FOREGROUND_PRIOR) / FOREGROUND_PRIOR)
        with torch.no_grad():
            for conv, a in zip(self.conf, PRIORS_PER_LOCATION):
                assert isinstance(conv, nn.Conv2d) and conv.bias is not None  # built above with a bias
                bias = torch.full((self.num_classes, a), fg_bias)
                bias[0] = 0.0  # channel k * A + a: row 0 is the background class
                conv.bias.copy_(bias.reshape(-1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = [x]
        for layer in self.extra_layers:
            previous = maps[-1]
            if min(previous.shape[-2:]) <= 1 and previous.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
                # A map one pixel high or wide goes through the next layer in float32: oneDNN's bf16 3x3 stride-2
                # convolution of a 1x1 channels_last map returned NaN in about one CPU run in four (torch 2.14, Xeon
                # with AMX; docs/performance.md). Such maps hold a few hundred numbers, so this costs nothing.
                with torch.autocast("cpu", enabled=False):
                    maps.append(layer(previous.float()))
                continue
            maps.append(layer(previous))
        b = x.shape[0]
        # reshape (not view): under channels_last the head outputs are not contiguous in this layout.
        locs = [head(m).reshape(b, 4, -1) for head, m in zip(self.loc, maps)]
        confs = [head(m).reshape(b, self.num_classes, -1) for head, m in zip(self.conf, maps)]
        # B x 4 x P → B x P x 4 (a transposed view: the criterion's cross-entropy wants the B x C x P layout back).
        return torch.cat(locs, dim=2).transpose(1, 2), torch.cat(confs, dim=2).transpose(1, 2)


__all__ = ["SSDHead", "EXTRA_WIDTHS", "MID_CHANNELS", "OUT_CHANNELS"]
