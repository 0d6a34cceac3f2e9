"""ROCK and baseline SSD: backbone, auxiliary block, detection head, priors, box coding and losses.

Public entry points: `build_model`, `build_criterion` (builder), `feature_map_sizes`, `make_priors` (priors),
`fold_backbone_batchnorm`, `unfolded_state_dict` (fuse). Attributes resolve lazily so that light users (the data
pipeline only needs `rock_dist.model.priors`) do not import torchvision and the whole network code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_model": "builder", "build_criterion": "builder", "ROCKDetector": "detector", "ROCKCriterion": "losses",
    "feature_map_sizes": "priors", "make_priors": "priors", "fold_backbone_batchnorm": "fuse",
    "fold_all_batchnorm": "fuse", "unfolded_state_dict": "fuse",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"rock_dist.model.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rock_dist.model' has no attribute {name!r}")


__all__ = list(_EXPORTS)
