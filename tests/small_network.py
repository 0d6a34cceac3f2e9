"""The network the training tests train: ResNet-18 from scratch without layer4 and with the light SSD extra layers
(the quickstart's network, docs/architecture.md).

Imported by the test modules that run training (pytest puts tests/ on sys.path). What those tests check — the loop,
checkpoints, resumption, distributed ranks, faults — does not depend on the layout, and this one costs about 60 % of
the reference layout's training step on a CPU. The reference layout's shapes, parameter counts, weights and BN
folding are tested on their own (tests/test_model.py), and the evaluation, detection and export tests build it.
"""

from __future__ import annotations

SMALL_NETWORK = ["--backbone", "resnet18", "--backbone_stages", "3", "--extra_layers", "light", "--pretrained", "none"]
