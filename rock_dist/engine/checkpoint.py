"""Checkpoint and weights files: writing them atomically, rotating them, and loading them anywhere.

Two kinds of file (docs/training.md):
- weights-only (`save_weights`): {"format": "rock_dist-weights", "model", "model_config", "class_names",
  "scene_types", "postprocess", "provenance", "version"} — what `evaluate`, `detect` and `export` need, written at
  the end of training as NAME.pt and, with the same description, as NAME.safetensors + NAME.json
  (`engine.weights`, docs/weights.md);
- training checkpoint (`CheckpointManager.save`): the same keys with format "rock_dist-checkpoint" plus optimizer,
  scheduler, grad-scaler, step, data position, per-rank RNG states, the training config, the best val metric and
  the early-stopping count, and the EMA weights with --ema_decay.

Everything stored is CPU tensors and plain Python values with no wrapper prefixes (`module.` from DDP, `_orig_mod.`
from torch.compile), so any file loads with `torch.load(weights_only=True, map_location=...)` into 1 or N processes,
on CPU or GPU (docs/training.md). Writes go through `rock_dist.fsutil.atomic_torch_save`: an interrupted save
(Ctrl-C, crash, full disk) never replaces or removes the previous complete checkpoint.

Called by `rock_dist.engine.trainer` (saving, resuming) and by `evaluate` / `detect` / `export` (`load_model`).
"""

from __future__ import annotations

import errno
import os
import pickle
import warnings
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, cast

import torch

from rock_dist.config import ModelConfig, TrainConfig, from_dict, to_dict
from rock_dist.engine.weights import (WEIGHTS_FORMAT, describe, is_portable, portable_paths, read_portable, sidecar,
                                      stored_postprocess, training_provenance, write_safetensors)
from rock_dist.errors import CheckpointError, DataError
from rock_dist.fsutil import atomic_path, atomic_torch_save, atomic_write_json

if TYPE_CHECKING:
    from rock_dist.model.detector import ROCKDetector

CHECKPOINT_FORMAT = "rock_dist-checkpoint"
CHECKPOINT_VERSION = 1
_PREFIXES = ("module.", "_orig_mod.")
_PERIODIC = re.compile(r"^checkpoint_step(\d+)\.pt$")
BEST_NAME = "checkpoint_best.pt"
FINAL_WEIGHTS_NAME = "weights_final.pt"
FINAL_EMA_WEIGHTS_NAME = "weights_final_ema.pt"  # --ema_decay: the averaged weights, beside the raw ones
AUTO_RESUME = "auto"  # --checkpoint_path auto: the newest checkpoint in --save_path
# fsutil.atomic_path's temporary names for the files above: `.{final name}.{random}.tmp`.
_TEMP = re.compile(r"^\.(checkpoint_step\d+\.pt|checkpoint_best\.pt|weights_final(_ema)?\.(pt|safetensors|json))"
                   r"\..+\.tmp$")
_SPACE_MARGIN = 1.05  # pickling adds a little to the tensor bytes


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP / torch.compile key prefixes (possibly stacked, e.g. `module._orig_mod.`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def unwrap_detector(model: torch.nn.Module) -> ROCKDetector:
    """`unwrap(model)` typed as the detector it is in this package (a ROCKDetector, or a stand-in with its interface
    in tests: not checked at run time)."""
    return cast("ROCKDetector", unwrap(model))


def to_cpu(obj: Any) -> Any:
    """Deep copy of nested dicts/lists/tuples with every tensor moved to the CPU (for device-independent files)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU state dict of the unwrapped model, without wrapper prefixes, in the unfolded key layout (the trainer folds
    the backbone's BatchNorms into its convolutions; unfolded weights load into any model of the config)."""
    from rock_dist.model.fuse import unfolded_state_dict

    return strip_wrapper_prefixes(to_cpu(unfolded_state_dict(unwrap(model))))


def save_weights(path: str | Path, model: torch.nn.Module, model_config: ModelConfig, class_names: list[str],
                 scene_types: list[str], *, train_config: TrainConfig | None = None,
                 iterations: int | None = None) -> Path:
    """Write the final weights (docs/weights.md) atomically: `path` (NAME.pt) and, with the same description,
    NAME.safetensors + NAME.json beside it. The post-processing settings come from `train_config.loss` (defaults
    without one), the provenance from `train_config` and `iterations`. Returns `path`."""
    path = Path(path)
    state = model_state(model)
    description = describe(model_config, class_names, scene_types,
                           loss=train_config.loss if train_config is not None else None,
                           provenance=training_provenance(train_config, iterations))
    save_with_space_check(path, {**description, "model": state})
    tensors_path, json_path = portable_paths(path)
    # Tensors first, then the JSON that names their hash: a crash in between leaves a pair that is refused as such.
    save_with_space_check(tensors_path, state, write=_atomic_safetensors)
    atomic_write_json(json_path, sidecar(description, tensors_path))
    return path


def _atomic_safetensors(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        mode = tmp.stat().st_mode
        write_safetensors(tmp, state)
        os.chmod(tmp, mode)  # safetensors recreates the file with 0600; keep the ordinary permissions of the others


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a weights file (.pt, or .safetensors / .json of the portable pair) or a training checkpoint onto the CPU
    (torch files with `weights_only=True`); DataError when unusable."""
    path = Path(path)
    if is_portable(path):
        return read_portable(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint file not found")
    try:
        with warnings.catch_warnings():
            # Bytes that are not a checkpoint can make torch's unpickler warn about a strange pickle protocol
            # before it fails: the one error below says what matters, the warning would be a second message.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._weights_only_unpickler")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message suggests weights_only=False, which would execute whatever a damaged or foreign file
        # holds: never the advice for a checkpoint that should contain only tensors, numbers and strings.
        raise DataError(f"{path}: not a rock_dist checkpoint: it is damaged or holds objects other than tensors, "
                        "numbers and strings (rock_dist.train writes only those; such a file is not loaded "
                        "further)") from err
    except Exception as err:  # torch raises many types for truncated/foreign files
        first = str(err).split(". ")[0].splitlines()[0] if str(err) else ""
        raise DataError(f"{path}: not a readable rock_dist checkpoint (expected a file written by rock_dist.train "
                        f"or rock_dist's weights; {type(err).__name__}: {first})") from err
    if not isinstance(data, dict) or data.get("format") not in (WEIGHTS_FORMAT, CHECKPOINT_FORMAT):
        raise DataError(f"{path}: not a rock_dist weights file or checkpoint (missing or unknown 'format')")
    for key in ("model", "model_config"):
        if key not in data:
            raise DataError(f"{path}: checkpoint has no {key!r} entry")
    return data


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> str:
    """What keeps `given` from loading into a model whose state dict is `expected` ('' when it fits): missing and
    unexpected keys and shape differences, counted, with the first few named."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} in the file vs {tuple(v.shape)} in the model" for k, v in expected.items()
              if k in given and isinstance(given[k], torch.Tensor) and tuple(given[k].shape) != tuple(v.shape)]
    parts = [f"{len(items)} {what} (e.g. {', '.join(items[:3])})" for what, items in
             (("missing", missing), ("unexpected", unexpected), ("with another shape", shapes)) if items]
    return "; ".join(parts)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[ROCKDetector, ModelConfig,
                                                                                dict[str, Any]]:
    """Build the model stored in `path` (weights file or training checkpoint) on `device`, in eval mode.

    Returns (model, model_config, meta) with meta = {"format", "class_names", "scene_types", "step", "path",
    "postprocess" (the stored settings, {} for older files; see config.resolve_postprocess), "provenance"}.
    The backbone is built with `pretrained="none"` because the file holds all weights.
    """
    from rock_dist.model.builder import build_model

    data = read_checkpoint(path)
    model_config = from_dict(ModelConfig, data["model_config"])
    model_config.pretrained = "none"
    model = build_model(model_config)
    state = strip_wrapper_prefixes(data["model"])
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise DataError(f"{path}: weights do not fit the stored model configuration (backbone "
                        f"{model_config.backbone}, {'SSD' if model_config.no_rock else 'ROCK'}, "
                        f"{model_config.num_classes} classes): {problem}")
    model.load_state_dict(state, strict=True)
    model.to(device)
    model.eval()
    meta = {"format": data["format"], "class_names": list(data.get("class_names", [])),
            "scene_types": list(data.get("scene_types", [])), "step": data.get("step"), "path": str(path),
            "postprocess": stored_postprocess(data, path), "provenance": data.get("provenance") or {}}
    return model, model_config, meta


def periodic_checkpoints(save_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the periodic checkpoints in `save_dir`, oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = []
    for p in save_dir.iterdir():
        m = _PERIODIC.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume_path(path: str | Path, save_path: str | Path | None = None) -> Path | None:
    """`--checkpoint_path` as a file, or a directory meaning "its newest periodic checkpoint" (None if it has none,
    so a requeued job with an empty save directory starts fresh), or `auto`: the same in `save_path`, which need not
    exist yet. The newest is the latest complete one: every checkpoint is written under a temporary name and renamed
    when complete."""
    if str(path) == AUTO_RESUME:
        if save_path is None:
            raise ValueError("--checkpoint_path auto needs the run's save directory")
        found = periodic_checkpoints(save_path)
        return found[-1][1] if found else None
    path = Path(path)
    if path.is_dir():
        found = periodic_checkpoints(path)
        return found[-1][1] if found else None
    if not path.is_file():
        raise DataError(f"--checkpoint_path {path}: no such file or directory")
    return path


class CheckpointManager:
    """Writes training checkpoints into one directory: the last `keep` periodic ones and the best one.

    Only the main process calls `save` / `save_best`. A new file is complete under its final name before any older
    one is deleted, so an interruption at any moment leaves at least the previous checkpoint loadable.
    """

    def __init__(self, save_dir: str | Path, keep: int) -> None:
        self.save_dir = Path(save_dir)
        self.keep = max(1, keep)

    def path_for(self, step: int) -> Path:
        return self.save_dir / f"checkpoint_step{step:07d}.pt"

    @property
    def best_path(self) -> Path:
        return self.save_dir / BEST_NAME

    @property
    def final_weights_path(self) -> Path:
        return self.save_dir / FINAL_WEIGHTS_NAME

    @property
    def final_ema_weights_path(self) -> Path:
        return self.save_dir / FINAL_EMA_WEIGHTS_NAME

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = self.path_for(step)
        save_with_space_check(path, state)
        for _, old in periodic_checkpoints(self.save_dir)[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def save_best(self, state: dict[str, Any]) -> Path:
        save_with_space_check(self.best_path, state)
        return self.best_path


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_with_space_check(path: Path, obj: Any, write: Callable[[Path, Any], None] = atomic_torch_save) -> None:
    """`write` (an atomic writer, `atomic_torch_save` by default) that first checks the free space of the target's
    file system (the new file is complete before any older one is removed, so a whole file's worth must be free) and
    turns a failed write into one CheckpointError naming the directory; what was saved before stays intact either
    way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    needed = int(_tensor_bytes(obj) * _SPACE_MARGIN) + (1 << 20)
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise CheckpointError(f"{path.parent}: not enough disk space to save {path.name}: about {needed / 2**20:.1f} "
                              f"MiB needed, {free / 2**20:.1f} MiB free; free some space or use another "
                              "--save_path (the checkpoints already there are intact)")
    try:
        write(path, obj)
    except (OSError, RuntimeError) as err:
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC or shutil.disk_usage(path.parent).free < needed
        cause = "the disk is full" if full else f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise CheckpointError(f"{path.parent}: could not save {path.name} ({cause}); the checkpoints already there "
                              "are intact") from err


def remove_stale_temps(save_dir: str | Path) -> list[tuple[str, int]]:
    """Delete the temporary files that writers killed mid-save left in `save_dir` (only our own temp-name pattern;
    call it while holding the directory's run lock, so no live writer owns them). Returns (name, bytes) removed."""
    save_dir = Path(save_dir)
    removed = []
    for p in sorted(save_dir.iterdir()) if save_dir.is_dir() else []:
        if _TEMP.match(p.name) and p.is_file():
            size = p.stat().st_size
            p.unlink(missing_ok=True)
            removed.append((p.name, size))
    return removed


def samples_seen_of(data: Mapping[str, Any]) -> int:
    """The global data position of a training checkpoint, also for checkpoints that stored micro-batches per rank
    (their stream started at epoch 0 and every rank had taken `batch_in_epoch` batches of `batch_size`)."""
    if "samples_seen" in data:
        return int(data["samples_seen"])
    return int(data.get("batch_in_epoch", 0)) * int(data.get("batch_size", 1)) * int(data.get("world_size", 1))


def training_checkpoint(*, model: torch.nn.Module, model_config: ModelConfig, class_names: list[str],
                        scene_types: list[str], optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                        step: int, samples_seen: int, data_mode: str, world_size: int, batch_size: int,
                        gradient_accumulation_steps: int, rng_states: list[dict[str, Any]],
                        train_config: dict[str, Any], best_metric: float | None,
                        best_step: int | None, task_weighting: dict[str, Any] | None = None,
                        evals_since_best: int = 0, ema: torch.nn.Module | None = None,
                        ema_decay: float = 0.0) -> dict[str, Any]:
    """The dict a training checkpoint stores (all CPU, weights_only-loadable).

    Data position: `samples_seen` = the training stream's global position (samples all ranks had taken together,
    rock_dist.data.epoch_plan), with the `data_mode`, `world_size` and `batch_size` it was reached with.
    Checkpoints of earlier versions stored `batch_in_epoch` (micro-batches per rank) instead; `samples_seen_of`
    converts. `task_weighting`: the adaptive auxiliary weights' state (engine.task_weighting; None: fixed weights).
    `evals_since_best`: validations since the best val metric (early stopping). `ema`: the averaged model of
    --ema_decay (engine.ema; stored like `model`, None without EMA) and its `ema_decay`.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": model_state(model),
        "model_config": to_dict(model_config),
        "class_names": list(class_names),
        "scene_types": list(scene_types),
        "optimizer": to_cpu(optimizer.state_dict()),
        "scheduler": to_cpu(scheduler.state_dict()),
        "scaler": to_cpu(scaler.state_dict()) if scaler is not None else None,
        "step": step,
        "samples_seen": samples_seen,
        "data_mode": data_mode,
        "world_size": world_size,
        "batch_size": batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "rng": to_cpu(rng_states),
        "train_config": train_config,
        "best_metric": best_metric,
        "best_step": best_step,
        "task_weighting": task_weighting if task_weighting is not None else {"name": "fixed"},
        "evals_since_best": evals_since_best,
        "ema": model_state(ema) if ema is not None else None,
        "ema_decay": ema_decay if ema is not None else None,
    }


__all__ = ["WEIGHTS_FORMAT", "CHECKPOINT_FORMAT", "BEST_NAME", "FINAL_WEIGHTS_NAME", "FINAL_EMA_WEIGHTS_NAME",
           "AUTO_RESUME", "strip_wrapper_prefixes",
           "unwrap", "unwrap_detector", "to_cpu", "model_state", "save_weights", "read_checkpoint", "load_model",
           "periodic_checkpoints", "resolve_resume_path", "CheckpointManager", "training_checkpoint",
           "samples_seen_of", "save_with_space_check", "remove_stale_temps"]
