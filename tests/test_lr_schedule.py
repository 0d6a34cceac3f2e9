"""The stateless LR schedule: step decay as MultiStepLR, linear decay to zero, warmup."""

from __future__ import annotations

import pytest
import torch

from rock_dist.engine.lr_schedule import lr_factor


def test_step_schedule_equals_multisteplr() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 5, 5], gamma=0.5)
    for step in range(8):
        want = opt.param_groups[0]["lr"]
        got = 0.3 * lr_factor(step, schedule="step", num_iters=8, milestones=(2, 5, 5), gamma=0.5)
        assert got == pytest.approx(want, rel=1e-12), step
        opt.step()
        sched.step()


def test_linear_decays_to_zero_and_warmup_ramps_up() -> None:
    factors = [lr_factor(s, schedule="linear", num_iters=10) for s in range(11)]
    assert factors[0] == 1.0 and factors[10] == 0.0
    assert all(a > b for a, b in zip(factors, factors[1:]))
    warm = [lr_factor(s, schedule="step", num_iters=10, warmup_iters=4) for s in range(6)]
    assert warm == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        lr_factor(0, schedule="cosine", num_iters=10)  # type: ignore[arg-type]
