"""`python -m rock_dist.detect MODEL_PATH --image_path DIR --detection_output_path DIR` — detections on image files.

Reads every file of --image_path (any size, any format Pillow reads; EXIF rotation applied), resizes it to the
model's input exactly like the evaluation pipeline, runs the model in batches, decodes the boxes (score
>= --conf_threshold, per-class NMS) and maps them back to the original pixels. The model comes from a weights file
(.pt, or .safetensors with its .json) or a checkpoint; the decoding settings (--conf_threshold, --nms_iou,
--max_detections) are those saved with the weights unless given on the command line (docs/weights.md). Writes per
image:
- `<detection_output_path>/<stem>.png`: the image with boxes, class names and scores drawn, and one
  `<detection_output_path>/detections.json` with every image's boxes (pixel xyxy), scores, labels, class names
  (and the scene prediction when the model has one);
- with --scene_output_path / --depth_output_path / --normals_output_path (`--<task>_output_path`): the scene label on
  the image, the colour-mapped depth, the RGB-coded normals, at the original image size (each task's
  `original_picture`, rock_dist.tasks).
Unreadable files are reported and skipped; the run goes on. --get_throughput reports end-to-end images/s from
reading the file to the decoded, NMS-filtered boxes, with the device synchronised before each clock reading (the
reference's timer was not synchronised and left decoding out).
"""

from __future__ import annotations

if __name__ == "__main__":  # answer --help before the heavy imports below
    from rock_dist.cli import answer_help_early

    answer_help_early("DetectConfig", description=__doc__.splitlines()[0])

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rock_dist.cli import run_cli
from rock_dist.config import DetectConfig, parse_config
from rock_dist.errors import ConfigError, DataError
from rock_dist.fsutil import atomic_path, atomic_write_json
from rock_dist.perf.timing import synchronize
from rock_dist.tasks import registry

DETECTIONS_JSON = "detections.json"


@dataclass
class LoadedImage:
    """One readable input: its path, the original uint8 3 x H0 x W0 picture and the resized network input."""

    path: Path
    original: torch.Tensor
    resized: torch.Tensor


def list_inputs(image_dir: Path) -> list[Path]:
    """Every non-hidden regular file directly in `image_dir`, sorted by name (readability is tested later)."""
    if not image_dir.is_dir():
        raise DataError(f"--image_path {image_dir}: not a directory")
    return sorted(p for p in image_dir.iterdir() if p.is_file() and not p.name.startswith("."))


def read_image(path: Path) -> torch.Tensor:
    """uint8 3 x H x W RGB of an image file; raises OSError/ValueError-like errors for unreadable files."""
    from PIL import Image, ImageOps

    with Image.open(path) as picture:
        picture = ImageOps.exif_transpose(picture)  # phone pictures: show them the way they were taken
        rgb = np.asarray(picture.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def resize_to_input(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize uint8 3 x H x W to the network input size the way EvalTransform does (bilinear, antialiased)."""
    import torchvision.transforms.v2.functional as TF

    if tuple(image.shape[1:]) == tuple(size):
        return image
    return TF.resize(image, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def _output_stems(paths: Sequence[Path]) -> dict[Path, str]:
    """Output file stem per input; inputs that share a stem (a.jpg, a.png) keep their extension in it."""
    counts: dict[str, int] = {}
    for p in paths:
        counts[p.stem] = counts.get(p.stem, 0) + 1
    return {p: (p.stem if counts[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.')}") for p in paths}


def _save_png(tensor: torch.Tensor, path: Path) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        # zlib level 1 instead of PIL's 6: on a 2-core AMD EPYC a 640x480 picture took 29 ms instead of 99 ms for
        # 30 % more bytes, and the encoder was half of the quickstart's drawing step (27 of 59 s for 240 images).
        Image.fromarray(tensor.permute(1, 2, 0).numpy()).save(tmp, format="PNG", compress_level=1)


class Detector:
    """A loaded model plus everything needed to go from image files to pixel-space detections."""

    def __init__(self, model: torch.nn.Module, image_size: tuple[int, int], device: torch.device,
                 conf_threshold: float, nms_iou: float, max_detections: int) -> None:
        from rock_dist.engine.checkpoint import unwrap_detector

        self.model = model  # what runs the forward pass (possibly a torch.compile wrapper)
        self.detector = unwrap_detector(model)  # its ROCKDetector, for decoding
        self.image_size = image_size
        self.device = device
        self.conf_threshold = conf_threshold
        self.nms_iou = nms_iou
        self.max_detections = max_detections

    def load(self, path: Path) -> LoadedImage:
        original = read_image(path)
        return LoadedImage(path, original, resize_to_input(original, self.image_size))

    @torch.no_grad()
    def run(self, images: Sequence[LoadedImage]) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Detections (boxes in each image's original pixels, on the device) and the raw outputs of one batch."""
        from rock_dist.data.batch import prepare_batch

        batch = prepare_batch({"images": torch.stack([im.resized for im in images])}, self.device)
        outputs = self.model(batch["images"])
        # Thresholding at decode time is the same as decoding at 0.05 and filtering afterwards: a box below the
        # threshold can never suppress one above it in NMS, and the kept ones are the top scores anyway.
        decoded = self.detector.postprocess(outputs, score_threshold=self.conf_threshold, nms_iou=self.nms_iou,
                                         max_detections=self.max_detections)
        results = []
        for im, det in zip(images, decoded):
            h0, w0 = im.original.shape[1:]
            scale = torch.tensor([w0, h0, w0, h0], dtype=torch.float32, device=det["boxes"].device)
            results.append({"boxes": det["boxes"].float() * scale, "scores": det["scores"].float(),
                            "labels": det["labels"]})
        return results, outputs


def _aux_pictures(cfg: DetectConfig, im: LoadedImage, outputs: dict[str, torch.Tensor], index: int,
                  scene_types: Sequence[str], stem: str) -> dict[str, Any]:
    """Write the requested pictures of one image's auxiliary predictions (`--<task>_output_path`, each task's
    `original_picture` at the original size); return what the tasks record about it (the scene prediction)."""
    info: dict[str, Any] = {}
    size = (int(im.original.shape[1]), int(im.original.shape[2]))
    for task in registry.all_tasks():
        if task.name not in outputs:
            continue
        prediction = outputs[task.name][index]
        described = task.describe(prediction, scene_types)
        if described is not None:
            info[task.name] = described
        folder = getattr(cfg, _output_flag(task.name)[2:], "")
        picture = task.original_picture(prediction, size, image=im.original, scene_types=scene_types) \
            if folder else None
        if picture is not None:
            _save_png(picture, Path(folder) / f"{stem}.png")
    return info


def _output_flag(task: str) -> str:
    """The command-line option naming the folder for a task's pictures (a DetectConfig field)."""
    return f"--{task}_output_path"


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(DetectConfig, argv, description=__doc__.splitlines()[0])
    from rich.console import Console

    from rock_dist.engine.run_plan import resolve_run_plan
    from rock_dist.engine.visualize import draw_detections
    from rock_dist.evaluate import describe_postprocess, load_for_inference

    console = Console(highlight=False)
    err_console = Console(highlight=False, stderr=True)
    plan = resolve_run_plan(cfg)
    device = plan.torch_device
    given = {name: getattr(cfg, name) for name in ("conf_threshold", "nms_iou", "max_detections")}
    plan, runner, meta = load_for_inference(plan, device, cfg.model_path, no_rock=cfg.no_rock,
                                            aux_tasks=cfg.aux_tasks, given=given)
    model_config = plan.model
    for task in registry.names():
        flag = _output_flag(task)
        if getattr(cfg, flag[2:], "") and task not in model_config.tasks:
            raise ConfigError(f"{flag}: the model in {cfg.model_path} does not predict {task} "
                              f"(its tasks: {' '.join(model_config.tasks) or 'none, baseline SSD'})")
    class_names, scene_types = list(plan.class_names), list(plan.scene_types)
    post = plan.postprocess
    detector = Detector(runner, plan.image_size, device, post.conf_threshold, post.nms_iou, post.max_detections)
    inputs = list_inputs(Path(cfg.image_path))
    stems = _output_stems(inputs)
    out_dir = Path(cfg.detection_output_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"Detecting in {len(inputs)} file(s) of {cfg.image_path} with {cfg.model_path} on {device} "
                  f"({describe_postprocess(post, meta['postprocess'], given)})")

    if cfg.get_throughput and inputs:
        # One untimed pass first: CUDA context, cuDNN autotuning and allocator growth are not steady-state cost.
        warm = [im for im in (_try_load(detector, p) for p in inputs[:plan.batch_size]) if im is not None]
        if warm:
            detector.run(warm)
            synchronize(device)

    summary: dict[str, Any] = {}
    skipped: list[str] = []
    timed_seconds = 0.0
    timed_images = 0
    for start in range(0, len(inputs), plan.batch_size):
        chunk = inputs[start:start + plan.batch_size]
        synchronize(device)
        t0 = time.perf_counter()
        loaded: list[LoadedImage] = []
        for path in chunk:
            try:
                loaded.append(detector.load(path))
            except Exception as err:  # noqa: BLE001 - Pillow raises many types for broken files
                skipped.append(path.name)
                # soft_wrap: one line whatever the width, so logs and greps see the whole path.
                err_console.print(f"[yellow]skipping {path}: cannot read it as an image "
                                  f"({type(err).__name__}: {err})[/]", soft_wrap=True)
        if not loaded:
            continue
        results, outputs = detector.run(loaded)
        synchronize(device)
        timed_seconds += time.perf_counter() - t0
        timed_images += len(loaded)

        for index, (im, det) in enumerate(zip(loaded, results)):
            stem = stems[im.path]
            boxes, scores, labels = det["boxes"].cpu(), det["scores"].cpu(), det["labels"].cpu()
            _save_png(draw_detections(im.original, boxes, labels, scores, class_names,
                                      min_side=cfg.picture_min_side), out_dir / f"{stem}.png")
            entry: dict[str, Any] = {
                "height": int(im.original.shape[1]), "width": int(im.original.shape[2]),
                "boxes": [[round(v, 2) for v in box] for box in boxes.tolist()],
                "scores": [round(v, 5) for v in scores.tolist()],
                "labels": labels.tolist(),
                "class_names": [class_names[i - 1] if 0 < i <= len(class_names) else str(i)
                                for i in labels.tolist()],
            }
            entry.update(_aux_pictures(cfg, im, outputs, index, scene_types, stem))
            summary[im.path.name] = entry
            # Scores come sorted from NMS; the JSON has them all, the console the best few.
            shown = [f"{n} {s:.2f}" for n, s in zip(entry["class_names"][:5], entry["scores"][:5])]
            more = len(entry["scores"]) - len(shown)
            found = (f"{len(entry['scores'])} detection(s): " + ", ".join(shown) + (f", +{more} more" if more else "")
                     if shown else "no detection")
            # What the tasks recorded with a name (the scene type), e.g. " [scene: kitchen]".
            task_text = "".join(f" [{task}: {entry[task]['name']}]" for task in registry.names()
                                if isinstance(entry.get(task), dict) and "name" in entry[task])
            console.print(f"{im.path.name}: {found}{task_text}")

    if inputs and not summary:
        raise DataError(f"--image_path {cfg.image_path}: none of its {len(inputs)} file(s) could be read as an image "
                        f"({', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}); nothing was written")
    atomic_write_json(out_dir / DETECTIONS_JSON, {"model_path": str(cfg.model_path), **{name: getattr(post, name)
                                                                                         for name in given},
                                                  "images": summary, "skipped": skipped})
    console.print(f"{len(summary)} image(s) written to {out_dir}" +
                  (f", {len(skipped)} unreadable file(s) skipped" if skipped else ""))
    if cfg.get_throughput:
        if timed_images:
            console.print(f"throughput: {timed_images / timed_seconds:.1f} images/s end to end (read, decode, "
                          f"resize, model, box decoding + NMS; {timed_images} images, batch {plan.batch_size}, "
                          f"{device}; drawing and writing excluded)")
        else:
            console.print("throughput: no readable image to time")
    return 0


def _try_load(detector: Detector, path: Path) -> LoadedImage | None:
    """The image, or None when it cannot be read (used for the warm-up; the main loop reports such files)."""
    try:
        return detector.load(path)
    except Exception:  # noqa: BLE001 - Pillow raises many types for broken files
        return None


if __name__ == "__main__":
    run_cli(main)
