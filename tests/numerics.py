"""Tolerances and limits shared by the tests, each derived from the arithmetic rather than tuned to one CPU.

Imported by the test modules (pytest puts tests/ on sys.path). Nothing here depends on the machine's speed, its
vector extensions or its rounding.
"""

from __future__ import annotations

import torch

# Two computations of the same function that differ only in evaluation order (a BatchNorm folded into its
# convolution, channels_last instead of NCHW) are compared in float64. Each float64 operation rounds by at most
# 2**-53 ≈ 1.1e-16 relative; a ResNet-18 ROCK has about 60 layers and its widest sums have 3*3*512 = 4608 terms, so
# even the worst-case bound (depth × terms × 2**-53 ≈ 3e-11 of the activations' scale) sits far below 1e-9,
# whatever kernels a CPU picks. A real mistake (a missing bias, a wrong epsilon) is of order 1e-3 or more. In
# float32 the same bound would be about 2e-3, which is why comparisons in float32 with 1e-4 failed on some CPUs.
EQUIVALENT_RTOL = 1e-9
EQUIVALENT_ATOL = 1e-9

# Subprocess time limits are hang guards, not speed checks: a slow or busy CPU may take many times longer than
# a fast one, so the limit is set far above any honest run (the slowest measured, ~15 min for the whole suite).
HANG_GUARD_S = 3600


def to_float64(*items: torch.nn.Module | torch.Tensor) -> list:
    """The modules converted in place and the tensors as float64 copies, in the order given."""
    return [item.double() for item in items]


def assert_equivalent(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same keys and values equal to float64 rounding (see EQUIVALENT_RTOL)."""
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=EQUIVALENT_RTOL, atol=EQUIVALENT_ATOL,
                                   msg=lambda detail, key=key: f"{key}: {detail}")


__all__ = ["EQUIVALENT_RTOL", "EQUIVALENT_ATOL", "HANG_GUARD_S", "to_float64", "assert_equivalent"]
