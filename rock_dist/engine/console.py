"""Console output of training on the main process: a Rich progress bar on a terminal, plain lines otherwise.

`TrainConsole` is created by `rock_dist.engine.trainer` on every rank but prints only where `enabled` (the main
process). Modes:
- terminal and verbose: a live Rich bar with step, it/s, images/s, ETA, loss components and lr;
- not a terminal (logs, SLURM output files) and verbose: one plain line for the first step and then every
  `log_every` steps, because a live bar written to a file is unreadable;
- `--no_verbose`: nothing but warnings and the final summary.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping, TextIO


def format_duration(seconds: float) -> str:
    """H:MM:SS (or D days, H:MM:SS) for ETAs."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    text = f"{hours}:{minutes:02d}:{seconds:02d}"
    return f"{days}d {text}" if days else text


_ORDER = ("loss", "loss_det", "loss_loc", "loss_conf", "loss_scene", "loss_depth", "loss_normals")


def format_losses(losses: Mapping[str, float]) -> str:
    """`loss 3.21 det 2.10 loc 0.3 ...` (total first, then detection, then auxiliary; `loss_` prefix dropped)."""
    parts = []
    names = sorted(losses, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
    for name in names:
        value = losses[name]
        short = name[len("loss_"):] if name.startswith("loss_") else name
        parts.append(f"{short} {value:.4g}")
    return " ".join(parts)


class TrainConsole:
    """Progress reporting for the training loop (see module docstring for the modes)."""

    def __init__(self, *, enabled: bool, verbose: bool, total_steps: int, start_step: int, log_every: int,
                 stream: TextIO | None = None, force_plain: bool | None = None) -> None:
        self.enabled = enabled
        self.verbose = verbose and enabled
        self.total = total_steps
        self.start_step = start_step
        self.log_every = max(1, log_every)
        self.stream = stream or sys.stdout
        plain = force_plain if force_plain is not None else not self.stream.isatty()
        self.use_bar = self.verbose and not plain
        self._progress: Any = None
        self._task: Any = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> "TrainConsole":
        if self.use_bar:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=Console(file=self.stream), transient=False, refresh_per_second=4)
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start_step,
                                                 speed="", stats="")
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def update(self, step: int, losses: Mapping[str, float], lr: float, it_per_s: float, images_per_s: float
               ) -> None:
        """Report the state after optimizer step `step` (1-based global iteration)."""
        if not self.verbose:
            return
        stats = f"{format_losses(losses)} lr {lr:.3g}"
        speed = f"{it_per_s:.2f} it/s {images_per_s:.1f} img/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, speed=speed, stats=stats)
            return
        # The first step too: a log file then shows at once that training started and how fast.
        if step % self.log_every == 0 or step == self.total or step == self.start_step + 1:
            done = step - self.start_step
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / done * (self.total - step) if done else float("nan")
            self.print(f"step {step}/{self.total} | {stats} | {speed} | eta {format_duration(eta)}")

    def print(self, message: str) -> None:
        """A line for verbose mode (goes above the bar when one is shown)."""
        if not self.verbose:
            return
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=self.stream, flush=True)

    def always(self, message: str) -> None:
        """A line printed even with --no_verbose (warnings, the final summary)."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=self.stream, flush=True)


__all__ = ["TrainConsole", "format_duration", "format_losses"]
