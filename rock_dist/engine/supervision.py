"""What the outside world tells a training process: a preemption signal, or the death of its launcher.

Used by the trainer (`rock_dist.engine.trainer`):

- `StopRequest` turns SIGTERM and SIGUSR1 (SLURM preemption, spot reclaim, `scancel --signal`) into a flag. The
  trainer agrees on it across ranks at the next step boundary, writes a complete checkpoint of the step reached
  and exits with `PREEMPTED_EXIT_CODE`; resuming from the save directory continues exactly. A second signal while
  stopping is ignored (the checkpoint is being written); SIGKILL still ends everything at once.
- `ParentWatchdog` makes a rank started by a launcher (`accelerate launch`, torchrun) exit within about a second
  when that launcher dies without stopping it (SIGKILL of the job, an out-of-memory kill): the rank is reparented,
  its parent pid changes, and it exits at once with `ORPHANED_EXIT_CODE`, writing nothing further. A process
  started without a launcher has no watchdog: closing the shell that ran `python -m rock_dist.train &` must not
  end a run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect of a process that stopped on SIGTERM
ORPHANED_EXIT_CODE = 125
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installs handlers for STOP_SIGNALS (main thread only) and remembers the first signal received."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal = signum
            # A scheduler often signals the whole process group, so the loader workers die too. PyTorch's SIGCHLD
            # handler would raise that as an error at whatever line the trainer is on (mid-backward, out of step
            # with the other ranks); with the default handler the loss of the workers shows at the next fetch,
            # where the trainer expects it, and the stop agreed at that step boundary still writes the checkpoint.
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            print(f"rock_dist: received {signal.Signals(signum).name}: stopping at the next step boundary with a "
                  "checkpoint", file=sys.stderr, flush=True)

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def under_launcher() -> bool:
    """Whether this process was started by torchrun / `accelerate launch` (they set these for every rank)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


class ParentWatchdog:
    """A daemon thread that ends this process when its parent process changes (see the module docstring)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.parent = os.getppid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            if os.getppid() != self.parent:
                print(f"rock_dist: the launcher (pid {self.parent}) is gone; rank {os.environ.get('RANK', '?')} "
                      "exits without writing anything further", file=sys.stderr, flush=True)
                os._exit(ORPHANED_EXIT_CODE)  # no cleanup handlers: they could write files

    def start(self) -> "ParentWatchdog":
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="rock_dist-parent-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()


__all__ = ["PREEMPTED_EXIT_CODE", "ORPHANED_EXIT_CODE", "STOP_SIGNALS", "StopRequest", "ParentWatchdog",
           "under_launcher"]
