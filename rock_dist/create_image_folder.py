"""`python -m rock_dist.create_image_folder --data_path SPLIT_DIR --save_path DIR` — a shard split's images as files.

Produces the input folder of `rock_dist.detect` from shards: every sample's RGB member is written as
`<save_path>/<sample key>.jpg` (or `.png`, whatever the shard stores). The bytes are copied, not re-encoded, so
the files are exactly the pictures the model is evaluated on. The number written is checked against the split's
manifest; a missing RGB member or an unreadable shard is a DataError naming the shard.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Iterator, Sequence

from rock_dist.cli import run_cli
from rock_dist.config import CreateImageFolderConfig, parse_config
from rock_dist.errors import DataError
from rock_dist.fsutil import atomic_write_bytes

RGB_SUFFIXES: tuple[str, ...] = ("rgb.jpg", "rgb.png")


def iter_rgb_members(shard_path: str) -> Iterator[tuple[str, str, bytes]]:
    """(sample key, file extension, bytes) of every sample's RGB member in one WebDataset tar, in tar order.

    A WebDataset key is the member name up to its first dot (`nyuv2_0004.rgb.jpg` -> `nyuv2_0004`). A sample
    without an RGB member is a DataError (the shards' contract makes it mandatory).
    """
    keys: set[str] = set()
    with_rgb: set[str] = set()
    try:
        with tarfile.open(shard_path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = Path(member.name).name
                key, _, suffix = name.partition(".")
                keys.add(key)
                if suffix in RGB_SUFFIXES:
                    handle = tar.extractfile(member)
                    if handle is None:
                        raise DataError(f"{shard_path}: member {member.name} cannot be read")
                    with_rgb.add(key)
                    yield key, suffix.split(".")[-1], handle.read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{shard_path}: not a readable tar shard ({err}); rebuild it or run "
                        "`python -m rock_dist.shards verify`") from err
    missing = sorted(keys - with_rgb)
    if missing:
        raise DataError(f"{shard_path}: sample(s) {', '.join(missing[:5])} have no rgb.jpg/rgb.png member")


def export_images(data_path: str | Path, save_path: str | Path) -> list[Path]:
    """Write every image of the split at `data_path` into `save_path`; return the written paths."""
    from rock_dist.data.manifest import load_manifest

    manifest = load_manifest(data_path)
    out_dir = Path(save_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    names: set[str] = set()
    for shard in manifest.shard_paths():
        for key, ext, data in iter_rgb_members(shard):
            if key in names:
                raise DataError(f"{shard}: sample key {key!r} appears twice in the split")
            names.add(key)
            target = out_dir / f"{key}.{ext}"
            atomic_write_bytes(target, data)
            written.append(target)
    if len(written) != manifest.num_samples:
        raise DataError(f"{manifest.path}: lists {manifest.num_samples} samples but the shards hold "
                        f"{len(written)} images")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(CreateImageFolderConfig, argv, description=__doc__.splitlines()[0])
    written = export_images(cfg.data_path, cfg.save_path)
    print(f"wrote {len(written)} images from {cfg.data_path} to {cfg.save_path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
