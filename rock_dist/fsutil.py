"""Atomic file writes: nothing rock_dist writes is ever seen half-written under its final name.

Used by the shard builder (shards, manifests), checkpoints, and the JSON outputs of evaluation. Each writer writes to
a temporary name in the same directory, flushes and fsyncs it, then renames it into place (atomic on POSIX).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on success fsync and rename it to `final`, on error delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; give the final file the permissions an ordinary open() would (0666 minus umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (a writer that may still own a file)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(final: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(final, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_torch_save(final: str | os.PathLike[str], obj: Any) -> None:
    import torch

    with atomic_path(final) as tmp:
        torch.save(obj, tmp)
