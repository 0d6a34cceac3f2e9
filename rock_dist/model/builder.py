"""Builders of the detector and its criterion from the typed configuration.

The entry points (train, evaluate, detect, bench) and `engine.checkpoint.load_model` call these; nothing else
constructs the network. `num_classes` / `num_scenes` in the ModelConfig come from the shard manifest.
"""

from __future__ import annotations

from rock_dist.config import BACKBONES, LossConfig, ModelConfig
from rock_dist.errors import ConfigError
from rock_dist.model.backbone import STAGES, build_backbone
from rock_dist.model.boxes import match_priors
from rock_dist.model.detector import ROCKDetector
from rock_dist.model.losses import Matcher, ROCKCriterion
from rock_dist.model.priors import feature_map_sizes
from rock_dist.model.ssd_head import EXTRA_WIDTHS
from rock_dist.tasks import registry


def check_model_config(cfg: ModelConfig) -> None:
    """ConfigError naming the flag when `cfg` cannot describe a network."""
    if cfg.backbone not in BACKBONES:
        raise ConfigError(f"--backbone {cfg.backbone!r}: choose one of {', '.join(BACKBONES)}")
    unknown = [t for t in cfg.aux_tasks if t not in registry.names()]
    if unknown:
        raise ConfigError(f"--aux_tasks {' '.join(unknown)}: unknown task; choose from {' '.join(registry.names())}")
    if not cfg.no_rock and not cfg.tasks:
        raise ConfigError("--aux_tasks is empty: give at least one task, or use --no_rock for the baseline SSD")
    h, w = cfg.image_size
    if h < 64 or w < 64:
        raise ConfigError(f"--image_size {h} {w}: both sides must be at least 64 pixels")
    if min(min(s) for s in feature_map_sizes(cfg.image_size, cfg.backbone)) < 1:
        raise ConfigError(f"--image_size {h} {w}: too small for six detection feature maps")
    if cfg.num_classes < 2:
        raise ConfigError(f"num_classes {cfg.num_classes}: need background plus at least one class")
    if cfg.num_scenes < 2 and "scene" in cfg.tasks:
        raise ConfigError(f"num_scenes {cfg.num_scenes}: the scene task needs at least two scene types")
    if cfg.backbone_stages not in STAGES:
        raise ConfigError(f"--backbone_stages {cfg.backbone_stages}: choose {' or '.join(map(str, STAGES))}")
    if cfg.extra_layers not in EXTRA_WIDTHS:
        raise ConfigError(f"--extra_layers {cfg.extra_layers!r}: choose {' or '.join(EXTRA_WIDTHS)}")
    if cfg.backbone_bn not in ("frozen", "train"):
        raise ConfigError(f"--backbone_bn {cfg.backbone_bn!r}: choose frozen or train")
    if cfg.depth_loss not in ("smoothl1", "berhu"):
        raise ConfigError(f"--depth_loss {cfg.depth_loss!r}: choose smoothl1 or berhu")


def build_model(cfg: ModelConfig) -> ROCKDetector:
    """The ROCK detector (or baseline SSD with `cfg.no_rock`), backbone weights per `cfg.pretrained`.

    Only the auxiliary branches of `cfg.tasks` are built. Raises ConfigError for bad settings or unavailable weights.
    """
    check_model_config(cfg)
    return ROCKDetector(cfg, build_backbone(cfg.backbone, cfg.pretrained, freeze_bn=cfg.backbone_bn == "frozen",
                                            stages=cfg.backbone_stages))


def build_criterion(cfg: ModelConfig, loss: LossConfig, matcher: Matcher = match_priors) -> ROCKCriterion:
    """The training criterion matching `build_model(cfg)` (same priors, same tasks), matching priors with `matcher`."""
    check_model_config(cfg)
    return ROCKCriterion(cfg, loss, matcher)


__all__ = ["build_model", "build_criterion", "check_model_config"]
