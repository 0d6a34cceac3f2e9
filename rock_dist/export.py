"""`python -m rock_dist.export WEIGHTS --format onnx [--out FILE] [--opset N]` — the model as an ONNX graph.

Reads any weights file or checkpoint (.pt, or .safetensors with its .json), folds every BatchNorm into its convolution
(exact in eval mode) and exports with torch's ONNX exporter (torch.export based; needs the `export` extra: onnx,
onnxscript, and onnxruntime for the check). The graph (docs/weights.md):
- input `images`: float32 B x 3 x H x W, RGB scaled to [0, 1] then ImageNet-normalised, H x W the stored input size;
  the batch axis B is dynamic;
- outputs `loc` (B x P x 4), `conf` (B x P x C logits), one per trained task (`scene`, `depth`, `normals`), exactly
  as the PyTorch model returns them, and `priors` (P x 4, normalised cx cy w h) to decode `loc` against;
- metadata property `rock_dist`: the weights' description (model config, class and scene names, post-processing,
  provenance) plus the input normalisation and the output names, as JSON.
Decoding is left to the caller (`rock_dist.model.postprocess.postprocess_detections` with the saved settings): NMS
over a dynamic number of boxes is where runtimes differ most.

With --check (default) onnxruntime runs the file on a random batch of 2 and every output is compared with PyTorch
(tolerance: ONNX_TOLERANCE). The legacy TorchScript-based exporter is not used: with a dynamic batch it bakes the
example's batch size into this model's head reshapes and returns wrong loc/conf for other batch sizes.
"""

from __future__ import annotations

if __name__ == "__main__":  # answer --help before the heavy imports below
    from rock_dist.cli import answer_help_early

    answer_help_early("ExportConfig", description=__doc__.splitlines()[0])

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from rock_dist.cli import run_cli
from rock_dist.config import ExportConfig, ModelConfig, parse_config, to_dict
from rock_dist.errors import ConfigError, RockError
from rock_dist.fsutil import atomic_path

if TYPE_CHECKING:
    from rock_dist.model.detector import ROCKDetector

INPUT_NAME = "images"
METADATA_KEY = "rock_dist"
# torch's exporter implements operator set 18 and later; it converts to lower versions only on a best-effort basis
# (and keeps 18 without saying so when that fails).
MIN_OPSET = 18
# Largest |ONNX − PyTorch| allowed per output, relative to that output's largest magnitude. Both are float32
# evaluations of the same network that differ only in kernels and summation order (oneDNN/ATen vs onnxruntime's MLAS,
# plus the exporter's op fusions). Each float32 operation rounds by at most 2**-24 ≈ 6e-8 relative; a ResNet ROCK is
# ~60 layers deep with sums of up to 3*3*512 = 4608 terms, whose rounding errors add like a random walk: ~√4608 × 6e-8
# ≈ 4e-6 of a layer's scale, and √60 ≈ 8 layers' worth accumulate, ~3e-5 of the output's scale. 1e-4 leaves a margin
# of 3 (measured on a random ResNet-18 model: ~1e-6). The worst-case bound (60 × 4608 × 6e-8 ≈ 2e-2) is never
# approached. A real export mistake — a wrong layout, a dropped bias, a batch size baked into a reshape — is of the
# order of the output's scale (the legacy exporter's batch bug: 0.5 to 2).
ONNX_TOLERANCE = 1e-4


def output_names(tasks: Sequence[str]) -> list[str]:
    """The graph's outputs in order: detection heads, the trained auxiliary tasks, the priors."""
    return ["loc", "conf", *tasks, "priors"]


class ExportWrapper(torch.nn.Module):
    """The detector with positional outputs (ONNX graphs have no dict outputs) and its priors as the last one."""

    def __init__(self, model: ROCKDetector) -> None:
        super().__init__()
        self.model = model
        self.names = output_names(model.tasks)[:-1]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(images)
        return (*(outputs[name] for name in self.names), self.model.priors)


def _require(*modules: str) -> None:
    """ConfigError naming the missing package when the `export` extra is not installed."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"--format onnx needs {', '.join(missing)}: install the export extra "
                          "(pip install -e \".[export]\")")


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence onnx_ir's notice that the priors initializer is also a graph output (intended: see ExportWrapper)."""
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def onnx_metadata(model_config: ModelConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """What the graph's `rock_dist` metadata property holds (docs/weights.md)."""
    from rock_dist.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    h, w = model_config.image_size
    return {"format": "rock_dist-onnx", "model_config": to_dict(model_config),
            "class_names": meta["class_names"], "scene_types": meta["scene_types"],
            "postprocess": meta["postprocess"], "provenance": meta["provenance"], "source": meta["path"],
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, h, w], "dtype": "float32",
                      "normalisation": "RGB / 255, then (x - mean) / std per channel",
                      "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "outputs": output_names(model_config.tasks)}


def export_onnx(model: ROCKDetector, model_config: ModelConfig, meta: dict[str, Any], out: Path,
                opset: int) -> None:
    """Write `model` (eval mode, on the CPU) to `out` as ONNX with a dynamic batch axis, atomically."""
    import onnx

    wrapper = ExportWrapper(model).eval()
    example = torch.zeros(2, 3, *model_config.image_size)  # batch 2: a batch of 1 could be specialised away
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(wrapper, (example,), input_names=[INPUT_NAME],
                                    output_names=output_names(model_config.tasks),
                                    dynamic_shapes={INPUT_NAME: {0: batch}}, opset_version=opset, dynamo=True,
                                    verbose=False)
    if program is None:  # only the legacy exporter (dynamo=False) returns None
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNX program")
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(onnx_metadata(model_config, meta))
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))


def compare_with_onnxruntime(path: Path, model: ROCKDetector, image_size: Sequence[int], batch_size: int = 2,
                             seed: int = 0) -> dict[str, float]:
    """max |ONNX − PyTorch| / max |PyTorch| per output, for one random batch run through both."""
    import onnxruntime

    images = torch.randn(batch_size, 3, *image_size, generator=torch.Generator().manual_seed(seed))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {INPUT_NAME: images.numpy()})
    with torch.no_grad():
        want = ExportWrapper(model).eval()(images)
    names = [o.name for o in session.get_outputs()]
    return {name: float((torch.from_numpy(g) - w).abs().max() / w.abs().max().clamp_min(1e-12))
            for name, g, w in zip(names, got, want)}


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(ExportConfig, argv, description=__doc__.splitlines()[0])
    from rich.console import Console

    from rock_dist.engine.checkpoint import load_model
    from rock_dist.model.fuse import fold_all_batchnorm

    console = Console(highlight=False)
    if cfg.opset < MIN_OPSET:
        raise ConfigError(f"--opset {cfg.opset}: torch's ONNX exporter needs {MIN_OPSET} or later")
    _require("onnx", "onnxscript", *(("onnxruntime",) if cfg.check else ()))
    model, model_config, meta = load_model(cfg.model_path, "cpu")  # DataError for anything but rock_dist weights
    fold_all_batchnorm(model.eval())
    out = Path(cfg.out) if cfg.out else Path(cfg.model_path).with_suffix(".onnx")
    console.print(f"Exporting {cfg.model_path} ({model_config.describe()}) to {out} (ONNX opset {cfg.opset}, "
                  "dynamic batch)")
    export_onnx(model, model_config, meta, out, cfg.opset)
    console.print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); outputs: "
                  f"{', '.join(output_names(model_config.tasks))}")
    if cfg.check:
        differences = compare_with_onnxruntime(out, model, model_config.image_size)
        console.print("onnxruntime vs PyTorch, max |difference| / max |value|: " +
                      ", ".join(f"{name} {value:.1e}" for name, value in differences.items()))
        worst = max(differences, key=differences.__getitem__)
        if differences[worst] > ONNX_TOLERANCE:
            raise RockError(f"{out}: the exported graph disagrees with PyTorch on {worst} "
                            f"({differences[worst]:.1e} of its scale, more than {ONNX_TOLERANCE:.0e}); the file is "
                            "kept for inspection")
    return 0


if __name__ == "__main__":
    run_cli(main)
