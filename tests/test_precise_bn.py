"""The BatchNorm statistics pass (engine/precise_bn.py): exact batch statistics, frozen layers untouched."""

from __future__ import annotations

import torch
from torch import nn

from rock_dist.engine.precise_bn import average_batchnorm_stats, recompute_batchnorm_stats, trained_batchnorms


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    net.train()
    net[4].eval()  # a frozen layer, as the backbone's BatchNorms are with --backbone_bn frozen
    return net


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    # Different means and scales per batch: a plain EMA of them would not equal their mean.
    return [torch.randn(4, 3, 8, 8, generator=generator) * (1 + k) + k for k in range(3)]


def test_statistics_are_the_mean_of_the_batch_statistics_and_frozen_layers_stay() -> None:
    net = _net()
    frozen_before = {k: v.clone() for k, v in net[4].state_dict().items()}
    inputs: list[torch.Tensor] = []
    handle = net[1].register_forward_hook(lambda module, args, out: inputs.append(args[0].detach()))
    assert trained_batchnorms(net) == [net[1]]
    used = recompute_batchnorm_stats(net, iter(_batches() + _batches()), net, num_batches=3)
    handle.remove()
    assert used == 3 and len(inputs) == 3
    # BatchNorm keeps per-batch means and unbiased variances over (N, H, W); precise BN averages them equally.
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in inputs]).mean(0)
    # float32 sums over 4 x 6 x 6 = 144 values per channel: relative rounding ~1e-6, far below 1e-4.
    torch.testing.assert_close(net[1].running_mean, means, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net[1].running_var, variances, rtol=1e-4, atol=1e-5)
    assert int(net[1].num_batches_tracked) == 3 and net[1].momentum == 0.1  # momentum restored
    assert all(torch.equal(v, frozen_before[k]) for k, v in net[4].state_dict().items())


def test_no_batch_keeps_the_old_statistics_and_averaging_applies_to_trained_layers_only() -> None:
    net = _net()
    net[1].running_mean.fill_(0.5)
    assert recompute_batchnorm_stats(net, iter([]), net, num_batches=4) == 0
    assert torch.equal(net[1].running_mean, torch.full((4,), 0.5))
    assert recompute_batchnorm_stats(net, iter(_batches()), net, num_batches=0) == 0
    frozen_mean = net[4].running_mean.clone()
    average_batchnorm_stats(net, lambda t: t * 2)
    assert torch.equal(net[1].running_mean, torch.full((4,), 1.0))
    assert torch.equal(net[4].running_mean, frozen_mean)
