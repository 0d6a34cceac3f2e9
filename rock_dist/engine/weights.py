"""Portable weights: `NAME.safetensors` (the tensors) + `NAME.json` (what they are), and the description that every
weights file carries (docs/weights.md).

The description — model config, class and scene names, post-processing settings, training provenance — is one dict,
stored identically in the torch weights file (`NAME.pt`) and in the JSON beside the safetensors file, so evaluate,
detect, export and the inference bench read the same settings whichever file they are given. safetensors holds
nothing but tensors (no pickle, readable by other tools and languages); the JSON names its safetensors file and its
SHA-256, so a pair mixed up from two runs is refused instead of silently loaded.

Called by `engine.checkpoint` (`save_weights`, `read_checkpoint`), which owns atomic writing and the torch format.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

from rock_dist.config import POSTPROCESS_FIELDS, LossConfig, ModelConfig, check_postprocess, to_dict
from rock_dist.errors import DataError

WEIGHTS_FORMAT = "rock_dist-weights"
# Version of the description's layout (the keys below); readers accept files without one as version 1.
DESCRIPTION_VERSION = 1
SAFETENSORS_SUFFIX = ".safetensors"
JSON_SUFFIX = ".json"


def portable_paths(path: str | Path) -> tuple[Path, Path]:
    """(NAME.safetensors, NAME.json) for any of NAME.pt, NAME.safetensors, NAME.json."""
    path = Path(path)
    return path.with_suffix(SAFETENSORS_SUFFIX), path.with_suffix(JSON_SUFFIX)


def is_portable(path: str | Path) -> bool:
    """Whether `path` names the safetensors + JSON form (either of the two files)."""
    return Path(path).suffix in (SAFETENSORS_SUFFIX, JSON_SUFFIX)


def postprocess_settings(loss: LossConfig) -> dict[str, Any]:
    """The post-processing part of a LossConfig, as stored with the weights."""
    return {name: getattr(loss, name) for name in POSTPROCESS_FIELDS}


def training_provenance(train_config: Any | None, iterations: int | None) -> dict[str, Any]:
    """Who made the weights: rock_dist and torch versions, date (UTC), the writing process's command line, the
    iterations trained and the full training configuration (None for weights saved outside a training run)."""
    import rock_dist
    from rock_dist.invocation import command_line

    return {"rock_dist_version": rock_dist.__version__, "torch_version": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command_line(),
            "iterations": iterations, "train_config": to_dict(train_config) if train_config is not None else None}


def describe(model_config: ModelConfig, class_names: list[str], scene_types: list[str], *,
             loss: LossConfig | None = None, provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The description stored with the weights, as plain JSON values (so the .pt and the .json hold equal dicts)."""
    return json.loads(json.dumps({
        "format": WEIGHTS_FORMAT,
        "version": DESCRIPTION_VERSION,
        "model_config": to_dict(model_config),
        "class_names": list(class_names),
        "scene_types": list(scene_types),
        "postprocess": postprocess_settings(loss if loss is not None else LossConfig()),
        "provenance": dict(provenance or {}),
    }))


def stored_postprocess(data: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """The post-processing settings stored in a weights file or checkpoint ({} for files written before they were
    stored); DataError naming the file when one is malformed."""
    values = data.get("postprocess") or {}
    if not isinstance(values, Mapping):
        raise DataError(f"{path}: 'postprocess' is not a mapping of settings")
    values = {name: values[name] for name in POSTPROCESS_FIELDS if name in values}
    try:
        check_postprocess(values)
    except ValueError as err:
        raise DataError(f"{path}: stored post-processing setting {str(err).lstrip('-')}") from err
    return values


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_safetensors(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """The tensors alone (safetensors wants contiguous CPU tensors that share no memory: `model_state` copies)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    except SafetensorError as err:  # its I/O failures (a full disk) are not OSErrors; callers handle those
        raise OSError(str(err)) from err


def sidecar(description: Mapping[str, Any], tensors_path: Path) -> dict[str, Any]:
    """The JSON written beside `tensors_path` (already complete): the description plus the file's name and hash."""
    return {**description, "weights_file": tensors_path.name, "weights_sha256": file_sha256(tensors_path)}


def read_portable(path: str | Path) -> dict[str, Any]:
    """Load NAME.safetensors + NAME.json (either path given) into the dict a torch weights file holds
    ({"format", "model", "model_config", ...}); DataError naming the file when either is missing, foreign, damaged or
    when the two do not belong together."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    tensors_path, json_path = portable_paths(path)
    if not json_path.is_file():
        what = f"its description {json_path.name} is missing" if path != json_path else "file not found"
        raise DataError(f"{path}: {what} (rock_dist writes NAME.safetensors and NAME.json together; copy both)")
    try:
        description = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{json_path}: not a readable rock_dist weights description ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(description, dict) or description.get("format") != WEIGHTS_FORMAT:
        raise DataError(f"{json_path}: not a rock_dist weights description (missing or unknown 'format')")
    if path == json_path:  # the JSON names its tensors file (a bare name: never outside its own directory)
        tensors_path = json_path.parent / Path(str(description.get("weights_file", tensors_path.name))).name
    if not tensors_path.is_file():
        raise DataError(f"{tensors_path}: weights file not found (described by {json_path})")
    expected = description.get("weights_sha256")
    if expected is not None and file_sha256(tensors_path) != expected:
        raise DataError(f"{tensors_path}: does not match {json_path.name} (SHA-256 differs): the two files come from "
                        "different runs or one was changed; copy both from the same run")
    try:
        state = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DataError(f"{tensors_path}: not a readable safetensors file ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from err
    return {**description, "model": state}


__all__ = ["WEIGHTS_FORMAT", "DESCRIPTION_VERSION", "portable_paths", "is_portable", "postprocess_settings",
           "training_provenance", "describe", "stored_postprocess", "write_safetensors", "sidecar", "read_portable",
           "file_sha256"]
