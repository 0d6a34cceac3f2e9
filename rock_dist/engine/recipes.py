"""Which recipe rock_dist runs on a device: the hardware probes (bf16 support, AMX tiles, oneDNN's ISA cap), the
reference implementation's recipe and rock_dist's fast one.

The `Recipe` type and the code that applies it are in `engine.fast_path`; this module chooses. Called by
`engine.run_plan` (the bench's 'auto' settings), `engine.fast_path` users in the trainer, and the benchmarks
(`perf.recipes` builds its ladder between the two recipes here; `perf.autotune` uses the probes).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from rock_dist.engine.fast_path import REFERENCE_BATCH, Recipe, fused_adam_available

# The batch the fast path uses on a GPU (docs/performance.md: 32 is where bf16 + compile pay off; 64 adds ~13 % more
# but needs twice the memory, see `engine.memory.find_max_batch_size`).
FAST_GPU_BATCH = 32


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast has hardware support on `device` (CUDA: compute capability >= 8.0; CPU: what oneDNN
    reports, which does not mean it is faster than fp32 there — see `fast_recipe`)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def onednn_isa_cap() -> str:
    """The ISA cap oneDNN runs under: ONEDNN_MAX_CPU_ISA (or the older DNNL_ name), upper-case; "ALL" when unset."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()


def amx_available() -> bool:
    """Whether the CPU has AMX tile units (Intel Sapphire Rapids and later). There oneDNN runs bf16 convolutions
    2-3x faster than fp32 (README, performance); without AMX, bf16 autocast on a CPU is no faster, often slower."""
    # A cap below AMX (e.g. AVX2, to imitate a CPU without tiles) means oneDNN's bf16 kernels run without them,
    # however the CPU itself reports.
    cap = onednn_isa_cap()
    if cap != "ALL" and "AMX" not in cap:
        return False
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private API: absent in some torch versions
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which its bf16 kernels still use bf16 dot-product instructions.
_BF16_CAP_WORDS = ("BF16", "AMX", "FP16", "AVX10")


@functools.lru_cache(maxsize=1)
def _cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""  # not Linux: callers fall back (no bf16 instructions assumed, the platform's CPU name)


def cpuinfo_value(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line whose key is one of `keys` (lower-case, e.g. "model name"),
    stripped; None where there is no such line or no /proc/cpuinfo. The file is read once per process."""
    for line in _cpuinfo_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in keys:
            return value.strip()
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo "flags" on x86, "Features" on Arm), lower-case;
    empty where there is no /proc/cpuinfo (then no bf16 instructions are assumed and the CPU stays fp32)."""
    return frozenset((cpuinfo_value("flags", "features") or "").lower().split())


def cpu_bf16_instructions(flags: frozenset[str] | None = None) -> str | None:
    """Which bf16 instructions oneDNN can use on this CPU: "AMX" (tiles, Intel Sapphire Rapids and later),
    "AVX512_BF16" (bf16 dot products in AVX-512: AMD Zen 4 and later, Intel Cooper Lake), "ARM_BF16" (Armv8.6 BF16,
    e.g. Graviton 3), or None (AVX2 or plain AVX-512 CPUs, where oneDNN emulates bf16 and was measured 20x slower than
    fp32). An ONEDNN_MAX_CPU_ISA cap below the bf16 ISAs (e.g. AVX2) means None whatever the CPU reports."""
    if amx_available():
        return "AMX"
    cap = onednn_isa_cap()
    if cap != "ALL" and not any(word in cap for word in _BF16_CAP_WORDS):
        return None
    flags = cpu_flags() if flags is None else flags
    if "avx512_bf16" in flags:
        return "AVX512_BF16"
    if "bf16" in flags:  # the Arm "Features" word
        return "ARM_BF16"
    return None


def reference_recipe(batch_size: int = REFERENCE_BATCH) -> Recipe:
    """The reference implementation's recipe: fp32 eager, plain Adam, per-image CPU matching, pickle+PIL loader."""
    return Recipe(name="reference", batch_size=batch_size)


def fast_recipe(device: torch.device | str, batch_size: int | None = None) -> Recipe:
    """rock_dist's default recipe on `device`.

    On CUDA: bf16 autocast (if supported), channels_last, torch.compile, fused Adam, BN folding, batched matching on
    the GPU, our loader, batch 32. For training, BN folding is the opt-in `--fold_backbone_bn` of rock_dist.train
    (it changes the parametrisation the optimizer sees); for inference it is exact and always used. On a CPU: fused
    Adam, BN folding, batched matching and our loader, plus bf16 autocast and channels_last where the CPU has bf16
    instructions on x86 (`cpu_bf16_instructions`): AMX (ResNet-18 at 240x320 on a 2-core Sapphire Rapids: 4.9 img/s
    fp32 → 13.0 img/s) or AVX512_BF16 (a 2-core AMD EPYC Zen 4, ROCK training step at 128x160: 0.86 s fp32 → 0.45 s);
    elsewhere the CPU stays fp32 and NCHW (bf16 is emulated there; Arm's bf16 is left to the measured autotune).
    torch.compile stays off on CPUs: over a minute to compile, and slower on the 2-core machine. The benchmark's
    ladder re-measures all of these on any machine.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    cpu_bf16 = (device.type == "cpu" and cpu_bf16_instructions() in ("AMX", "AVX512_BF16")
                and bf16_supported(device))
    return Recipe(name="fast", batch_size=batch_size or (FAST_GPU_BATCH if cuda else REFERENCE_BATCH),
                  precision="bf16" if (cuda and bf16_supported(device)) or cpu_bf16 else "fp32",
                  channels_last=cuda or cpu_bf16,
                  cudnn_benchmark=cuda, compile=cuda, fused_adam=fused_adam_available(device), fold_bn=True,
                  device_matching=True, loader="rock_dist", num_workers=-1)


__all__ = ["FAST_GPU_BATCH", "bf16_supported", "onednn_isa_cap", "amx_available", "cpu_bf16_instructions",
           "cpu_flags", "cpuinfo_value", "reference_recipe", "fast_recipe"]
