"""The .npy encoding of shard members (`--aux_format npy`): bytes ↔ arrays, never pickles.

Written by `shardbuild.shard_writer` (and checked there by `shards verify`), read by `data.transforms.decode_sample`
in the loader workers; kept apart so the reader needs neither PIL nor h5py for it. The members' layouts (dtype,
channels) are the tasks' (rock_dist.tasks.catalog). Shared by the builder and the
streaming pipeline, so it stays in `rock_dist.data` (the builder imports it, never the other way round).
"""

from __future__ import annotations

import io

import numpy as np


def encode_npy(array: np.ndarray) -> bytes:
    """The .npy file of `array` (C order), as bytes."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def read_npy(data: bytes) -> np.ndarray:
    """The array of .npy bytes; ValueError when they are not a valid .npy file (object arrays are refused)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(str(err) or type(err).__name__) from None


__all__ = ["encode_npy", "read_npy"]
