"""Fold BatchNorm layers into the convolutions before them (conv → BN becomes one conv with a bias).

Used by the trainer's fast path and by inference (evaluate, detect, bench). The backbone's BatchNorms are frozen
(eval mode, running statistics fixed: see `backbone.ResNetBackbone`), so each is an affine per-channel map and
folding it is exact in both training and inference: y = γ (W x - μ) / √(σ² + ε) + β = W' x + b' with
W' = W γ / √(σ² + ε) and b' = β - μ γ / √(σ² + ε). This removes ~50 memory-bound BatchNorm passes per forward.

Folding re-parametrises the affine weights into the convolutions: forward results are identical, but an optimizer
created afterwards sees (and decays) W' and b' instead of W, γ, β. Create the optimizer after folding. For saving,
`unfolded_state_dict` turns a folded model back into the usual key layout (identity BatchNorms), so checkpoints and
weight files stay loadable by an unfolded model.

`fold_all_batchnorm` also folds the ROCK/SSD conv→BN pairs; those BatchNorms learn running statistics, so this is
for inference only (the model must be in eval mode).
"""

from __future__ import annotations

import torch
from torch import nn

from rock_dist.errors import ConfigError

# Attribute pairs (conv, bn) of torchvision's stem, BasicBlock and Bottleneck.
_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def _is_batchnorm(module: object) -> bool:
    """BatchNorm2d or SyncBatchNorm (after convert_sync_batchnorm), in both cases a per-channel affine map in eval."""
    return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm))


def _fold_pair(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Merge `bn` into `conv` in place (the caller then replaces `bn` by Identity)."""
    if bn.weight is None or bn.bias is None or bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{bn}: only an affine BatchNorm with running statistics can be folded")
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # per output channel
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    requires_grad = conv.weight.requires_grad
    conv.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
    conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)


def _find_pairs(root: nn.Module, prefix: str) -> list[tuple[str, nn.Module, str, str]]:
    """(module path, parent, conv attribute, bn attribute) of every conv directly followed by a BatchNorm2d."""
    found: list[tuple[str, nn.Module, str, str]] = []
    for name, module in root.named_modules(prefix=prefix):
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (conv_name, conv), (bn_name, bn) in zip(children[:-1], children[1:]):
                if isinstance(conv, nn.Conv2d) and _is_batchnorm(bn):
                    found.append((name, module, conv_name, bn_name))
        for conv_name, bn_name in _PAIRS:
            pair = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(pair[0], nn.Conv2d) and _is_batchnorm(pair[1]):
                found.append((name, module, conv_name, bn_name))
    return found


def _fold(model: nn.Module, roots: list[tuple[str, nn.Module]]) -> nn.Module:
    record: list[tuple[str, str, float, bool]] = getattr(model, "folded_batchnorm", [])
    for prefix, root in roots:
        for path, parent, conv_name, bn_name in _find_pairs(root, prefix):
            conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
            had_bias = conv.bias is not None
            _fold_pair(conv, bn)
            setattr(parent, bn_name, nn.Identity())
            base = f"{path}." if path else ""
            record.append((base + conv_name, base + bn_name, float(bn.eps), had_bias))
    # A plain attribute, read by `unfolded_state_dict`. nn.Module.__setattr__ takes any value; its annotation says
    # Tensor | Module only.
    model.folded_batchnorm = record  # type: ignore[assignment]
    return model


def fold_backbone_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every frozen BatchNorm of `model.backbone` into its convolution, in place; returns `model`.

    Exact in training and inference (the backbone's statistics never update). Works on a ROCKDetector or on a bare
    backbone; create the optimizer afterwards.
    """
    backbone = getattr(model, "backbone", model)
    if not getattr(backbone, "freeze_bn", True):
        # Trained statistics change every step: a fold would freeze them at today's values and change the model.
        raise ConfigError("--fold_backbone_bn needs --backbone_bn frozen (the backbone's BatchNorms are training)")
    prefix = "backbone" if backbone is not model else ""
    return _fold(model, [(prefix, backbone)])


def fold_all_batchnorm(model: nn.Module) -> nn.Module:
    """Fold the backbone's and the ROCK/SSD conv→BN pairs, in place, for inference; `model` must be in eval mode.

    BatchNorms that follow no convolution (the ROCK fusion BN after the residual sum) stay.
    """
    if model.training:
        raise ValueError("fold_all_batchnorm is for inference: call model.eval() first (ROCK/SSD BatchNorms "
                         "update their statistics in training, so folding them would change the model)")
    return _fold(model, [("", model)])


def unfolded_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a folded `model` in the unfolded key layout (identity BatchNorms carrying the bias).

    Loading it into an unfolded model of the same configuration gives the same function. A model never folded
    returns its ordinary state dict.
    """
    state = dict(model.state_dict())
    for conv_key, bn_key, eps, had_bias in getattr(model, "folded_batchnorm", []):
        bias = state.pop(f"{conv_key}.bias")
        if had_bias:
            state[f"{conv_key}.bias"] = torch.zeros_like(bias)
        state[f"{bn_key}.weight"] = torch.ones_like(bias)
        state[f"{bn_key}.bias"] = bias.clone()
        state[f"{bn_key}.running_mean"] = torch.zeros_like(bias)
        # running_var + eps == 1, so the BatchNorm divides by exactly 1.
        state[f"{bn_key}.running_var"] = torch.full_like(bias, 1.0 - eps)
        state[f"{bn_key}.num_batches_tracked"] = torch.zeros((), dtype=torch.long, device=bias.device)
    return state


__all__ = ["fold_backbone_batchnorm", "fold_all_batchnorm", "unfolded_state_dict"]
