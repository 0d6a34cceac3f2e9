"""The ROCK residual auxiliary block (Mordan et al., NeurIPS 2018), docs/architecture.md.

Called by `detector.ROCKDetector`. On the backbone map x (B x C x h x w, C = 2048 for ResNet-50) a shared encoder
feeds one branch per auxiliary task; each branch predicts its task (scene, depth, normals: the head each task module
of rock_dist.tasks declares, its channel count C_t and its pooling) from a C_t-channel map, and decodes that map back
to C channels; the decoded maps are added to x (residual fusion):
`out = ReLU(BN(x + Σ_t decoded_t))`. Only the branches of the trained tasks are built, so distributed training has no
parameters without gradients (the reference built all three).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rock_dist.tasks import registry

# BatchNorm momentum of every ROCK and SSD layer (reference).
BN_MOMENTUM = 0.01


def conv_bn_relu(c_in: int, c_out: int, kernel: int | tuple[int, int] = 1, *, stride: int = 1,
                 padding: int = 0) -> nn.Sequential:
    """Conv (with bias, as in the reference) → BatchNorm(momentum 0.01) → ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding),
                         nn.BatchNorm2d(c_out, momentum=BN_MOMENTUM), nn.ReLU(inplace=True))


class TaskBranch(nn.Module):
    """One auxiliary task: 1x1 512→256, 3x3 256→256, 1x1 256→512 (each +BN+ReLU), then 1x1 512→C_t (the task map),
    and the decoder 1x1 C_t→C +BN+ReLU back into the backbone space.

    forward(x B x 512 x h x w) → (decoded B x C x h x w, prediction), the prediction pooled from the task map by the
    task's `predict` (rock_dist.tasks): e.g. scene B x S log-probabilities, depth B x 1 x h x w log depth, normals
    B x 3 x h x w unnormalised normals. C_t is the task's `channels(num_scenes)`.
    """

    def __init__(self, task: str, backbone_channels: int, num_scenes: int = 27) -> None:
        super().__init__()
        self.task = task
        self.head = registry.get(task)
        task_channels = self.head.channels(num_scenes)
        self.features = nn.Sequential(conv_bn_relu(512, 256, 1), conv_bn_relu(256, 256, 3, padding=1),
                                      conv_bn_relu(256, 512, 1))
        self.task_map = nn.Conv2d(512, task_channels, 1)
        self.decoder = conv_bn_relu(task_channels, backbone_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.task_map(self.features(x))
        return self.decoder(t), self.head.predict(t)


class ROCKBlock(nn.Module):
    """Shared encoder (1x1 C→512, 3x3 512→512, +BN+ReLU) + one `TaskBranch` per task + residual fusion.

    forward(x B x C x h x w) → (fused B x C x h x w, {task: prediction}).
    """

    def __init__(self, backbone_channels: int, tasks: tuple[str, ...], num_scenes: int = 27) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("ROCKBlock needs at least one auxiliary task")
        self.tasks = tuple(tasks)
        self.encoder = nn.Sequential(conv_bn_relu(backbone_channels, 512, 1), conv_bn_relu(512, 512, 3, padding=1))
        self.branches = nn.ModuleDict({t: TaskBranch(t, backbone_channels, num_scenes) for t in self.tasks})
        self.fusion_bn = nn.BatchNorm2d(backbone_channels, momentum=BN_MOMENTUM)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        shared = self.encoder(x)
        out = x
        preds: dict[str, torch.Tensor] = {}
        for task, branch in self.branches.items():  # static: the set of branches is fixed at build time
            decoded, preds[task] = branch(shared)
            out = out + decoded
        return F.relu(self.fusion_bn(out)), preds


__all__ = ["BN_MOMENTUM", "conv_bn_relu", "TaskBranch", "ROCKBlock"]
