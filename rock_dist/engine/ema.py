"""Exponential moving average of the trained weights (`--ema_decay`), with timm's ModelEmaV2 semantics.

Called by `rock_dist.engine.trainer`, which builds the copy (`ModelEma.copy_of`: the model as training starts, or the
EMA weights a checkpoint stored, set up on the device like the trained model), calls `update` after every optimizer
step on every rank, and validates, checkpoints and saves `module` beside the raw weights (docs/training.md).

After each optimizer step every floating-point entry of the state dict, parameters and buffers (BatchNorm running
statistics) alike, becomes `decay * ema + (1 - decay) * model`; integer buffers (`num_batches_tracked`) are copied.
The parameters are the same on every rank after the step, so their averages are too; buffers follow the trainer's
rule for the raw model (rank 0's are broadcast before every evaluation and checkpoint).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn


class ModelEma:
    """The averaged copy `module` (eval mode, no gradients) and its `decay`."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay {decay}: must be above 0 and below 1")
        self.module = module.eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay

    @classmethod
    def copy_of(cls, model: nn.Module, decay: float, *, stored: Mapping[str, torch.Tensor] | None = None,
                prepare: Any = None) -> "ModelEma":
        """An EMA starting at a copy of `model` (a plain module, before the trainer's preparation), or at `stored`
        (the EMA state dict of a checkpoint, unfolded layout) when given; `prepare(module)` then sets the copy up as
        the trained model is (device, folded BatchNorms, memory format), so the two state dicts pair up entry by
        entry."""
        module = copy.deepcopy(model)
        if stored is not None:
            module.load_state_dict(stored, strict=True)
        return cls(prepare(module) if prepare is not None else module, decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards `model` (the trained module, unwrapped)."""
        source = model.state_dict()
        averaged, current = [], []
        for name, value in self.module.state_dict().items():
            if value.is_floating_point():
                averaged.append(value)
                current.append(source[name])
            else:
                value.copy_(source[name])
        # lerp(ema, model, 1 - decay) = decay * ema + (1 - decay) * model, one fused kernel per device for all.
        torch._foreach_lerp_(averaged, current, 1.0 - self.decay)


__all__ = ["ModelEma"]
