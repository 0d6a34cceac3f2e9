"""A short measured autotune of the training step on the machine at hand, cached per machine.

Called by `rock_dist.quickstart`, which uses it twice: to pick the fastest precision / memory format for this CPU (AMX,
AVX-512, AVX2 and Arm CPUs rank them differently: bf16 is 2-3x faster than fp32 with AMX tiles, ~1.9x with AVX512_BF16
on a Zen 4, and 20x slower on CPUs that only emulate it; channels_last helps on some CPUs and not on others) and to know
how long one step takes, so that the run can be sized to a time budget. Each candidate is timed on a synthetic batch
through the trainer's own step (`engine.step.train_step`, as the benchmark times it: device transfer, forward,
criterion, backward, optimizer step), after one untimed warm-up step. Results are cached in
`$ROCK_DIST_CACHE_DIR/autotune.json` (default `~/.cache/rock_dist`), keyed by CPU model, oneDNN ISA cap, torch version,
thread count, device and model configuration, so a second run on the same machine starts at once; `refresh=True`
measures again. The ranking is a property of the CPU, the step time is not: two machines of the same model (2-core
AMD EPYC Zen 3) took 0.86 s and 0.41-0.45 s for the same step (docs/quickstart_experiments.md, session 7), and a
laptop's speed changes with its power state. So `retime_best=True` (the quickstart's choice) re-times the cached
winner alone, a few seconds, and a run sized from a stale time neither overshoots its budget nor wastes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rock_dist.engine.fast_path import Precision, Recipe, fused_adam_available
from rock_dist.perf.recipes import bf16_supported, cpu_bf16_instructions, onednn_isa_cap
from rock_dist.perf.timing import measure


@dataclass(frozen=True)
class StepCandidate:
    """One combination the autotune times."""

    precision: Precision
    channels_last: bool

    @property
    def label(self) -> str:
        return f"{self.precision}{' + channels_last' if self.channels_last else ''}"

    def train_flags(self) -> list[str]:
        """The `rock_dist.train` flags that select this combination."""
        return ["--mixed_precision", "no" if self.precision == "fp32" else self.precision,
                "--channels_last", "yes" if self.channels_last else "no"]


@dataclass
class AutotuneResult:
    """Seconds per training step of every candidate (a CUDA run times only the fast path) and the fastest one."""

    best: StepCandidate
    seconds: dict[str, float] = field(default_factory=dict)  # candidate label -> seconds per step
    cached: bool = False
    retimed: bool = False  # read from the cache, then the fastest candidate timed again on this run

    @property
    def best_seconds(self) -> float:
        return self.seconds[self.best.label]


def candidates(device: torch.device) -> list[StepCandidate]:
    """What is worth timing on `device`: on a CPU fp32 in both memory formats, plus bf16 + channels_last where the
    CPU has bf16 instructions (AMX, AVX512_BF16 or Arm BF16; where oneDNN emulates bf16 its convolutions were
    measured 20x slower than fp32, so timing them would cost minutes for nothing); on CUDA the fast path only (bf16
    where supported)."""
    if device.type == "cuda":
        return [StepCandidate("bf16" if bf16_supported(device) else "fp32", True)]
    found = [StepCandidate("fp32", False), StepCandidate("fp32", True)]
    if cpu_bf16_instructions() is not None and bf16_supported(device):
        found.append(StepCandidate("bf16", True))
    return found


def measure_step_seconds(model_config: Any, loss_config: Any, batch_size: int, candidate: StepCandidate,
                         device: torch.device, *, steps: int = 2) -> float:
    """Seconds of one training step of `candidate` (mean over `steps` after one warm-up step)."""
    from rock_dist.engine.synthetic_batch import synthetic_batch
    from rock_dist.perf.train_bench import build_parts, step_runner

    recipe = Recipe(name=candidate.label, batch_size=batch_size, precision=candidate.precision,
                    channels_last=candidate.channels_last, fused_adam=fused_adam_available(device),
                    device_matching=True, loader="rock_dist")
    step = step_runner(build_parts(model_config, loss_config, recipe, device))
    batch = synthetic_batch(batch_size, model_config)
    return measure(lambda: step(batch), device, warmup=1, repeats=1, iters=max(1, steps)).median_s


def cache_path() -> Path:
    root = os.environ.get("ROCK_DIST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rock_dist")
    return Path(root) / "autotune.json"


def machine_key(device: torch.device, model_config: Any, batch_size: int) -> str:
    """What the timings depend on; a change of any part measures again."""
    from rock_dist.perf.data_bench import cpu_name

    cap = onednn_isa_cap()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    parts = [cpu_name(), f"isa={cap}", f"torch={torch.__version__}", f"threads={torch.get_num_threads()}",
             f"device={device.type}:{gpu}",
             f"model={model_config.backbone}/{model_config.backbone_stages}:{model_config.extra_layers}:"
             f"{tuple(model_config.image_size)}:"
             f"{'+'.join(model_config.tasks) or 'ssd'}:{model_config.backbone_bn}", f"batch={batch_size}"]
    return " | ".join(parts)


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a missing or damaged cache only means measuring again


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    from rock_dist.fsutil import atomic_write_json

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)
    except OSError:
        pass  # a read-only home directory costs the next run a re-measurement, nothing else


def autotune_training_step(model_config: Any, loss_config: Any, batch_size: int, device: torch.device, *,
                           refresh: bool = False, retime_best: bool = False, steps: int = 2,
                           only: Sequence[StepCandidate] | None = None,
                           measure: Callable[..., float] = measure_step_seconds,
                           log: Callable[[str], None] | None = None) -> AutotuneResult:
    """Time every candidate of `candidates(device)` (or `only` these) or read them from the cache, and return the
    fastest; with `retime_best`, a cached winner is timed again and its fresh time returned (and cached)."""
    key = machine_key(device, model_config, batch_size)
    path = cache_path()
    cache = _read_cache(path)
    options: Sequence[StepCandidate] = list(only) if only else candidates(device)
    stored = cache.get(key)
    stored = stored if isinstance(stored, dict) else {}
    cached = not refresh and all(c.label in stored for c in options)
    seconds = {c.label: float(stored[c.label]) for c in options} if cached else {}
    # The cached ranking stands (the winner stays the winner); with retime_best only its time is refreshed.
    cached_best = min(options, key=lambda c: seconds[c.label]) if cached else None
    if cached_best is None:
        to_time = list(options)
    else:
        to_time = [cached_best] if retime_best else []
    for candidate in to_time:
        seconds[candidate.label] = measure(model_config, loss_config, batch_size, candidate, device, steps=steps)
        if log is not None:
            log(f"  {candidate.label}: {seconds[candidate.label]:.2f} s per step of {batch_size} images")
    if to_time:
        cache[key] = {**stored, **{c.label: seconds[c.label] for c in to_time}}
        _write_cache(path, cache)
    best = cached_best or min(options, key=lambda c: seconds[c.label])
    return AutotuneResult(best, seconds, cached, retimed=cached and bool(to_time))


__all__ = ["StepCandidate", "AutotuneResult", "candidates", "measure_step_seconds", "autotune_training_step",
           "cache_path", "machine_key"]
