"""Config files for every command: `--config run.yaml` reads flag values from YAML or JSON, and a training run
writes its resolved flags as `config.yaml` beside its checkpoints so that `--config CHECKPOINT_DIR` repeats it.

Called by `rock_dist.config.parse_config` (reading; the values are type-checked there against the dataclass fields,
so this module knows nothing of the fields) and by the trainer (writing). The file holds flag names as keys, either
flat (`lr: 0.001`) or nested the way `to_dict` writes a config (`data: {batch_size: 8}`); both forms may be mixed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

#: File name of the resolved flags a training run writes into its --save_path.
RUN_CONFIG_NAME = "config.yaml"


class ConfigFileError(ValueError):
    """A config file that cannot be used; the message names the file and the problem."""


def resolve_config_path(path: str | Path) -> Path:
    """The file behind `--config PATH`: the file itself, or a run directory's `config.yaml`."""
    path = Path(path)
    if path.is_dir():
        candidate = path / RUN_CONFIG_NAME
        if not candidate.is_file():
            raise ConfigFileError(f"{path} is a directory without {RUN_CONFIG_NAME} (runs write it beside their "
                                  "checkpoints); give a YAML or JSON file or a training run's --save_path")
        return candidate
    if not path.is_file():
        raise ConfigFileError(f"{path} does not exist")
    return path


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Flag name -> raw value from a YAML or JSON file (nested sections flattened). Raises ConfigFileError."""
    import yaml  # accelerate depends on PyYAML; imported here so that `--help` does not pay for it

    file = resolve_config_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigFileError(f"{file}: cannot read it ({err})") from err
    try:
        # JSON is a subset of YAML 1.2 in practice; json first gives JSON files JSON's exact error messages.
        content = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigFileError(f"{file}: not valid {'JSON' if file.suffix == '.json' else 'YAML'} ({err})") from err
    if content is None:
        return {}
    if not isinstance(content, Mapping):
        raise ConfigFileError(f"{file}: expected a mapping of flag names to values, got {type(content).__name__}")
    flat: dict[str, Any] = {}
    _flatten(content, flat, file)
    return flat


def _flatten(content: Mapping[str, Any], out: dict[str, Any], file: Path) -> None:
    for key, value in content.items():
        if not isinstance(key, str):
            raise ConfigFileError(f"{file}: key {key!r} is not a flag name")
        name = key.lstrip("-").replace("-", "_")
        if isinstance(value, Mapping):
            _flatten(value, out, file)
        elif name in out:
            raise ConfigFileError(f"{file}: {name!r} is given twice")
        else:
            out[name] = value


def write_config_file(path: str | Path, values: Mapping[str, Any], header: str) -> None:
    """Write `values` (a `to_dict` config) as YAML, atomically, with `header` as a leading comment."""
    import yaml

    from rock_dist.fsutil import atomic_write_bytes

    comment = "".join(f"# {line}\n" for line in header.splitlines())
    atomic_write_bytes(path, (comment + yaml.safe_dump(_plain(values), sort_keys=False)).encode())


def _plain(value: Any) -> Any:
    # safe_dump refuses tuples; the config's tuples are lists on the command line anyway.
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


__all__ = ["RUN_CONFIG_NAME", "ConfigFileError", "resolve_config_path", "read_config_file", "write_config_file"]
