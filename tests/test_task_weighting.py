"""Task weighting strategies (engine.task_weighting): each update equals a hand computation, absent tasks keep
their weight, and the state round-trips through a checkpoint dict."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rock_dist.engine.task_weighting import WEIGHTINGS, build_task_weighting

BASE = {"scene": 3.0, "depth": 3.0, "normals": 30.0}
TASKS = ("scene", "depth", "normals")
ALL = {t: True for t in TASKS}


def test_fixed_weights_are_the_reference_ones_and_never_move() -> None:
    weighting = build_task_weighting("fixed", TASKS, BASE)
    weighting.update({"scene": 2.0, "depth": 0.1, "normals": 0.5}, ALL)
    assert weighting.weights() == BASE


def test_uncertainty_update_is_adam_on_the_exact_log_variance_gradient() -> None:
    lr = 0.1
    weighting = build_task_weighting("uncertainty", TASKS, BASE, lr=lr)
    losses = {"scene": 2.0, "depth": 0.1, "normals": 0.05}
    weighting.update(losses, ALL)
    # Step 1 from s = 0: g = 1 - base * L; Adam's first step is -lr * g / (|g| + eps).
    s1 = {}
    for t in TASKS:
        g = 1 - BASE[t] * losses[t]
        s1[t] = -lr * g / (abs(g) + 1e-8)
    assert weighting.weights() == pytest.approx({t: BASE[t] * math.exp(-s1[t]) for t in TASKS}, rel=1e-12)
    # Step 2: moments carried over, bias-corrected with n = 2.
    weighting.update(losses, ALL)
    for t in TASKS:
        g1 = 1 - BASE[t] * losses[t]
        g2 = 1 - BASE[t] * math.exp(-s1[t]) * losses[t]
        m = 0.9 * (0.1 * g1) + 0.1 * g2
        v = 0.999 * (0.001 * g1 * g1) + 0.001 * g2 * g2
        s2 = s1[t] - lr * (m / (1 - 0.9 ** 2)) / (math.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
        assert weighting.weights()[t] == pytest.approx(BASE[t] * math.exp(-s2), rel=1e-12)
    # Scene's loss x weight (6) is above 1: its variance grows and its weight drops; depth's (0.3) the reverse.
    assert weighting.weights()["scene"] < 3.0 < weighting.weights()["depth"]


def test_dwa_weights_follow_the_ratio_of_the_last_two_window_means() -> None:
    weighting = build_task_weighting("dwa", TASKS, BASE, dwa_temperature=2.0, dwa_window=2)
    steps = [{"scene": 2.0, "depth": 1.0, "normals": 0.5}, {"scene": 2.0, "depth": 1.0, "normals": 0.7},
             {"scene": 1.0, "depth": 1.0, "normals": 0.6}, {"scene": 1.0, "depth": 1.0, "normals": 0.6}]
    for i, losses in enumerate(steps):
        weighting.update(losses, ALL)
        if i < 3:  # fewer than two window means: the base weights
            assert weighting.weights() == pytest.approx(BASE)
    ratios = {"scene": 1.0 / 2.0, "depth": 1.0, "normals": 0.6 / 0.6}
    exp = {t: math.exp(r / 2.0) for t, r in ratios.items()}
    expected = {t: BASE[t] * 3 * exp[t] / sum(exp.values()) for t in TASKS}
    assert weighting.weights() == pytest.approx(expected, rel=1e-12)
    assert weighting.weights()["scene"] < BASE["scene"]  # the fastest-falling loss gets less weight


def test_gradnorm_moves_weights_toward_equal_gradient_norms_and_keeps_their_sum() -> None:
    lr = 0.025
    weighting = build_task_weighting("gradnorm", ("scene", "normals"), BASE, lr=lr, gradnorm_alpha=1.5)
    both = {"scene": True, "normals": True}
    # First step: L̃ = 1, targets = mean(G) = (3 * 1.0 + 30 * 0.2) / 2 = 4.5; scene's G 3 < 4.5 (raise it),
    # normals' 6 > 4.5 (lower it); each first Adam step moves by lr; the sum of the scales (2) is kept.
    weighting.update({"scene": 2.0, "normals": 0.5}, both, {"scene": 1.0, "normals": 0.2})
    assert weighting.weights() == pytest.approx({"scene": 3.0 * (1 + lr), "normals": 30.0 * (1 - lr)}, rel=1e-9)
    # Second step, scene's loss has halved: r_scene = 0.5 / 0.75, r_normals = 1 / 0.75.
    u = {"scene": 1 + lr, "normals": 1 - lr}
    losses, norms = {"scene": 1.0, "normals": 0.5}, {"scene": 1.0, "normals": 0.2}
    weighting.update(losses, both, norms)
    g = {t: 3.0 * u["scene"] * norms["scene"] if t == "scene" else 30.0 * u["normals"] * norms["normals"]
         for t in ("scene", "normals")}
    rel = {"scene": 0.5 / 0.75, "normals": 1.0 / 0.75}
    mean_g = sum(g.values()) / 2
    new = {}
    for t, first_grad in (("scene", -3.0), ("normals", 6.0)):
        target = mean_g * rel[t] ** 1.5
        grad = math.copysign(1.0, g[t] - target) * BASE[t] * norms[t]
        m = 0.9 * 0.1 * first_grad + 0.1 * grad
        v = 0.999 * 0.001 * first_grad ** 2 + 0.001 * grad ** 2
        new[t] = u[t] - lr * (m / (1 - 0.81)) / (math.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
    total = sum(new.values())
    expected = {t: BASE[t] * new[t] * 2 / total for t in new}
    assert weighting.weights() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", [w for w in WEIGHTINGS if w != "fixed"])
def test_an_absent_task_keeps_its_weight_and_state(name: str) -> None:
    weighting = build_task_weighting(name, TASKS, BASE, dwa_window=1)
    norms = {"scene": 1.0, "depth": 0.5, "normals": 0.1}
    weighting.update({"scene": 2.0, "depth": 0.2, "normals": 0.5}, ALL, norms)
    before = weighting.weights()
    state = copy.deepcopy(weighting.state_dict())
    # Depth absent from this step's global batch (its loss there is 0: no target anywhere).
    weighting.update({"scene": 1.5, "depth": 0.0, "normals": 0.4}, {**ALL, "depth": False}, norms)
    after = weighting.weights()
    assert after["depth"] == before["depth"]
    assert after["scene"] != before["scene"] or after["normals"] != before["normals"]
    for key in ("log_var", "scale"):
        if key in state:
            assert weighting.state_dict()[key]["depth"] == state[key]["depth"]
    if "adam" in state:
        assert weighting.state_dict()["adam"]["steps"]["depth"] == state["adam"]["steps"]["depth"]


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_state_round_trips_through_a_checkpoint(name: str, tmp_path) -> None:
    make = lambda: build_task_weighting(name, TASKS, BASE, dwa_window=2)  # noqa: E731
    norms = {"scene": 1.0, "depth": 0.5, "normals": 0.1}
    sequence = [{"scene": 2.0 - 0.1 * i, "depth": 0.3 + 0.01 * i, "normals": 0.5 - 0.02 * i} for i in range(7)]
    straight = make()
    for losses in sequence:
        straight.update(losses, ALL, norms)
    resumed = make()
    for losses in sequence[:3]:
        resumed.update(losses, ALL, norms)
    torch.save(resumed.state_dict(), tmp_path / "w.pt")
    again = make()
    again.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    for losses in sequence[3:]:
        again.update(losses, ALL, norms)
    assert again.weights() == straight.weights()  # exactly: the same float operations in the same order
    with pytest.raises(ValueError, match="task weighting"):
        build_task_weighting("fixed" if name != "fixed" else "dwa", TASKS, BASE).load_state_dict(
            straight.state_dict())
