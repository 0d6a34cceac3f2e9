"""ROCKDetector: backbone → (optional) ROCK block → SSD head, plus detection post-processing.

Built by `builder.build_model`; used by the trainer, evaluation, detection and the benchmarks. The loss lives in
`losses.ROCKCriterion` (model and criterion are separate, torchvision-detection style). `forward` has no
data-dependent Python control flow, so the model works under torch.compile, autocast and channels_last.
"""

from __future__ import annotations

import torch
from torch import nn

from rock_dist.config import ModelConfig
from rock_dist.model.backbone import ResNetBackbone
from rock_dist.model.postprocess import postprocess_detections
from rock_dist.model.priors import make_priors
from rock_dist.model.rock_block import ROCKBlock
from rock_dist.model.ssd_head import SSDHead


class ROCKDetector(nn.Module):
    """SSD with the ROCK auxiliary block (or the baseline SSD when `config.no_rock`).

    forward(images float B x 3 x H x W, ImageNet-normalised) → dict:
      "loc": B x P x 4 box offsets w.r.t. `priors` (variances 0.1 / 0.2),
      "conf": B x P x C class logits (C = config.num_classes, 0 = background),
      and per trained task: "scene" B x S log-probabilities, "depth" B x 1 x h x w log depth,
      "normals" B x 3 x h x w unnormalised normals, where (h, w) = priors.feature_map_sizes(image_size)[0].
    Attributes: `priors` (non-persistent buffer P x 4, normalised cx cy w h), `config`, `tasks`.
    """

    priors: torch.Tensor

    def __init__(self, config: ModelConfig, backbone: ResNetBackbone) -> None:
        super().__init__()
        self.config = config
        self.tasks: tuple[str, ...] = config.tasks
        self.backbone = backbone
        self.rock = (ROCKBlock(backbone.out_channels, self.tasks, config.num_scenes) if self.tasks else None)
        self.head = SSDHead(backbone.out_channels, config.num_classes, config.image_size, config.backbone,
                            config.extra_layers)
        # Derived from the configuration, so not saved in state dicts (a checkpoint cannot carry stale priors).
        self.register_buffer("priors", make_priors(config.image_size, config.backbone), persistent=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.backbone(images)
        outputs: dict[str, torch.Tensor] = {}
        if self.rock is not None:  # fixed at build time, not data-dependent
            x, aux = self.rock(x)
            outputs.update(aux)
        loc, conf = self.head(x)
        outputs["loc"] = loc
        outputs["conf"] = conf
        return outputs

    @torch.no_grad()
    def postprocess(self, outputs: dict[str, torch.Tensor], score_threshold: float = 0.05, nms_iou: float = 0.3,
                    max_detections: int = 100) -> list[dict[str, torch.Tensor]]:
        """Per image {"boxes": K x 4 normalised xyxy, "scores": K, "labels": K (1..C-1)}, on the outputs' device.

        Softmax, score > `score_threshold`, per-class NMS at `nms_iou` (batched over the whole batch), at most
        `max_detections` per image. `outputs` is not modified.
        """
        return postprocess_detections(outputs["loc"], outputs["conf"], self.priors, score_threshold=score_threshold,
                                      nms_iou=nms_iou, max_detections=max_detections)


__all__ = ["ROCKDetector"]
