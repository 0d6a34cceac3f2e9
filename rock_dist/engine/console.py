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


_DETECTION_ORDER = ("loss", "loss_det", "loss_loc", "loss_conf")


def format_losses(losses: Mapping[str, float]) -> str:
    """`loss 3.21 det 2.10 loc 0.3 ...` (total first, then detection, then auxiliary in registry order; `loss_`
    prefix dropped; adaptive task weights as `w_scene 2.9 ...`)."""
    from rock_dist.tasks import registry

    order = (*_DETECTION_ORDER, *(f"loss_{task}" for task in registry.names()))
    parts = []
    names = sorted(losses, key=lambda n: (order.index(n) if n in order else len(order), n))
    for name in names:
        value = losses[name]
        short = name[len("loss_"):] if name.startswith("loss_") else name
        short = "w_" + short[len("weight_"):] if short.startswith("weight_") else short  # task weights
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
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            # Our own ETA column: Rich's estimate needs two samples inside a 30 s window, so on a slow CPU (steps of
            # several seconds) it shows nothing for minutes; ours is there from the first finished step.
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
                TextColumn("{task.fields[stats]}"),
                console=Console(file=self.stream), transient=False, refresh_per_second=4)
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start_step,
                                                 speed="", stats="", eta="?")
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
        eta = format_duration(self.eta_seconds(step))
        if self._progress is not None:
            self._progress.update(self._task, completed=step, speed=speed, stats=stats, eta=eta)
            return
        # The first step too: a log file then shows at once that training started and how fast.
        if step % self.log_every == 0 or step == self.total or step == self.start_step + 1:
            self.print(f"step {step}/{self.total} | {stats} | {speed} | eta {eta}")

    def eta_seconds(self, step: int) -> float:
        """Seconds left after `step`, at the mean rate since the loop started (NaN before the first step)."""
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self._t0) / done * (self.total - step)

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


class EvalProgress:
    """Progress of an evaluation pass on the main process: a Rich bar on a terminal, otherwise plain lines at every
    tenth of the images, each with images/s and an ETA, so that a long end-of-run evaluation on a slow machine is
    visibly working. Used by `rock_dist.evaluate` and by the trainer's validation. `advance(n)` is the callback
    `engine.evaluation.evaluate` takes as `progress`; `total` is the main process's share of the images (ranks get
    about equal shares, so it tracks the whole), None if unknown."""

    def __init__(self, label: str, total: int | None, *, enabled: bool, stream: TextIO | None = None,
                 force_plain: bool | None = None, inside: TrainConsole | None = None) -> None:
        # `inside`: the training console whose live bar is on screen; Rich allows one live display at a time, so
        # the evaluation then becomes a second task of that bar.
        self.inside = inside._progress if inside is not None else None
        self.label = label
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stdout
        plain = force_plain if force_plain is not None else not self.stream.isatty()
        self.use_bar = enabled and not plain
        self.done = 0
        self._next_line = 0
        self._bar: Any = None  # the Rich Progress showing this pass: the training bar's, or our own
        self._task: Any = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> "EvalProgress":
        self._t0 = time.perf_counter()
        if self.use_bar and self.inside is not None:
            self._bar = self.inside
            self._task = self._bar.add_task(self.label, total=self.total, speed="", stats="", eta="?")
        elif self.use_bar:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta {task.fields[eta]}"),
                                 console=Console(file=self.stream), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, eta="?")
        elif self.enabled:
            print(f"{self.label}: started ({self.total or '?'} images)", file=self.stream, flush=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.inside is not None and self._bar is self.inside:
            self.inside.remove_task(self._task)
        elif self._bar is not None:
            self._bar.stop()
        self._bar = None
        if self.enabled and exc[0] is None and self.inside is None:
            elapsed = time.perf_counter() - self._t0
            print(f"{self.label}: {self.done} images in {elapsed:.1f} s", file=self.stream, flush=True)

    def eta_seconds(self) -> float:
        if not self.total or self.done <= 0:
            return float("nan")
        return (time.perf_counter() - self._t0) / self.done * max(self.total - self.done, 0)

    def advance(self, images: int) -> None:
        self.done += images
        if not self.enabled:
            return
        eta = format_duration(self.eta_seconds())
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, eta=eta)
            return
        if self.total and self.done >= self._next_line and self.done < self.total:
            rate = self.done / max(time.perf_counter() - self._t0, 1e-9)
            print(f"{self.label}: {self.done}/{self.total} images, {rate:.1f} img/s, eta {eta}", file=self.stream,
                  flush=True)
            self._next_line = self.done + max(1, self.total // 10)


__all__ = ["TrainConsole", "EvalProgress", "format_duration", "format_losses"]
