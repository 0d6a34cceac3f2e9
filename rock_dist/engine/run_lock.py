"""One training run per save directory: a lock file naming its owner, taken before the run's first write.

Used by the trainer (`rock_dist.engine.trainer`, main process only; the decision is broadcast so every rank stops
together). Two runs writing checkpoints into one directory would silently overwrite each other's files and delete
them in their keep-last-K cleanup, so a second run stops at once with a message naming the owner (host, pid, start
time, command). A lock whose owner is gone — same host, process no longer alive — is taken over with a message,
which is what a requeued or resumed job after a crash needs. A lock from another host cannot be checked; its
message says how to remove it when that run is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rock_dist.errors import ConfigError
from rock_dist.fsutil import pid_alive

LOCK_NAME = ".rock_dist.lock"


@dataclass
class RunLock:
    """A held lock; `release()` removes it if it is still ours."""

    path: Path
    token: str
    note: str = ""  # what happened while taking it (a stale lock taken over), for the console

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass  # already gone or replaced by a run that took over a stale lock: not ours to remove


def _describe(owner: dict[str, object]) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started))) if isinstance(started, (int, float)) \
        else "?"
    return f"pid {owner.get('pid')} on host {owner.get('host')} since {when} ({owner.get('command', '?')})"


def acquire(save_dir: str | os.PathLike[str]) -> RunLock:
    """Take the lock of `save_dir` (created if needed); ConfigError naming the owner when a live run holds it."""
    directory = Path(save_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    host = socket.gethostname()
    token = f"{host}:{os.getpid()}:{time.time_ns()}"
    record = {"host": host, "pid": os.getpid(), "started": time.time(), "token": token,
              "command": " ".join(sys.argv)[:300]}
    note = ""
    for _ in range(2):  # a second attempt after removing a stale lock
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except (OSError, ValueError):
                owner = {}
            pid = owner.get("pid")
            if owner.get("host") == host and isinstance(pid, int) and not pid_alive(pid):
                note = f"took over the lock of {directory} from a run that is gone ({_describe(owner)})"
                path.unlink(missing_ok=True)
                continue
            if owner.get("host") == host or not owner:
                raise ConfigError(f"--save_path {directory}: in use by another run ({_describe(owner)}); wait for "
                                  "it to finish or use another --save_path") from None
            raise ConfigError(f"--save_path {directory}: in use by a run on another host ({_describe(owner)}); "
                              f"if that run is gone, delete {path} and start again") from None
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        return RunLock(path, token, note)
    raise ConfigError(f"--save_path {directory}: could not take {path} (another run took it at the same moment)")


__all__ = ["LOCK_NAME", "RunLock", "acquire"]
