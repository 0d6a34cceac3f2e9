"""The benchmark's recipes: the reference implementation's, rock_dist's fast one, and the ladder between them.

`reference_recipe()` is the reference implementation's way (fp32, batch 8, eager, plain Adam, per-image matching on
the CPU, pickle + PIL loader); `fast_recipe(device)` is what rock_dist does by default on that device; `ladder(...)`
lists the intermediate recipes the benchmark measures so that each change is seen before and after. The `Recipe`
type and the code that applies a recipe belong to the engine (`rock_dist.engine.fast_path`, `engine.step`), so the
benchmark times exactly what training and inference run.

Called by `rock_dist.bench`, `perf.train_bench`, `perf.infer_bench` and `perf.autotune`. The per-device choice
(`fast_recipe`, `reference_recipe`, the hardware probes) is the engine's (`engine.recipes`), re-exported here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rock_dist.engine.fast_path import Precision, Recipe
# The per-device choice lives with the engine; re-exported here for the benchmarks that name them from perf.
from rock_dist.engine.recipes import (FAST_GPU_BATCH, amx_available, bf16_supported, cpu_bf16_instructions,
                                      fast_recipe, onednn_isa_cap, reference_recipe)

def ladder(device: torch.device | str, *, batch_size: int | None = None, compile: bool | None = None,
           precision: Precision | None = None) -> list[Recipe]:
    """Reference → fast, one change per row, in the order the changes are applied; the last row is named "fast".

    Rows: reference; +batched matching on the device; +batch N (only when N differs from 8); +bf16/fp16 (when the
    fast recipe uses it); +channels_last; +BN fold; +fused Adam; +compile (when the fast recipe uses it). Each row
    keeps the previous row's changes. channels_last and fused Adam are measured on every device even where the
    fast recipe leaves them off (CPU), so the table shows why; the final "fast" row is then `fast_recipe(device)`
    itself. `compile`/`precision` override the fast recipe's choice (e.g. to measure compile on a CPU).
    """
    device = torch.device(device)
    fast = fast_recipe(device, batch_size)
    fast = dataclasses.replace(fast, precision=precision or fast.precision,
                               compile=fast.compile if compile is None else compile)
    steps: list[tuple[str, dict[str, Any]]] = [
        ("+batched matching", {"device_matching": True}),
        (f"+batch {fast.batch_size}", {"batch_size": fast.batch_size}),
        (f"+{fast.precision}", {"precision": fast.precision}),
        ("+channels_last", {"channels_last": True}),
        ("+cuDNN autotune", {"cudnn_benchmark": fast.cudnn_benchmark}),
        ("+BN fold", {"fold_bn": True}),
        ("+fused Adam", {"fused_adam": True}),
        ("+compile", {"compile": fast.compile}),
    ]
    rows = [reference_recipe()]
    for name, change in steps:
        current = rows[-1]
        if all(getattr(current, k) == v for k, v in change.items()):
            continue  # no change on this device/with these overrides: no row
        rows.append(dataclasses.replace(current, name=name, **change))
    if _switches(rows[-1]) == _switches(fast):
        rows[-1] = dataclasses.replace(fast, name="fast")
    else:
        rows.append(fast)
    return rows


def _switches(recipe: Recipe) -> tuple[Any, ...]:
    """The settings that change the training step (not the name, not the loader)."""
    return (recipe.batch_size, recipe.precision, recipe.channels_last, recipe.cudnn_benchmark, recipe.compile,
            recipe.fused_adam, recipe.fold_bn, recipe.device_matching)


__all__ = ["FAST_GPU_BATCH", "bf16_supported", "onednn_isa_cap", "amx_available", "cpu_bf16_instructions",
           "reference_recipe", "fast_recipe", "ladder"]
