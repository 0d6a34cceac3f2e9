"""The quickstart's time budget and autotune: sizing by measured step times (injected here), tier fall-through,
the fastest candidate, and the per-machine cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rock_dist.perf.autotune as autotune
from rock_dist.config import LossConfig, ModelConfig
from rock_dist.quickstart_plan import (FEWEST_ITERS, TIERS, TRAIN_STARTUP_S, TrainingTier, plan_training,
                                       predicted_after_training_s)

TOP = TrainingTier("big", (240, 320), 8, min_iters=500, max_iters=1500)
LOW = TrainingTier("small", (176, 240), 8, min_iters=250, max_iters=1500)


def _plan(step_s: dict[str, float], budget_s: float, *, tiers=(TOP, LOW), timed: list[str] | None = None):
    now = [0.0]

    def step_seconds(tier: TrainingTier) -> float:
        now[0] += 3 * step_s[tier.name]  # the measurement itself spends budget
        if timed is not None:
            timed.append(tier.name)
        return step_s[tier.name]

    plan = plan_training(tiers, step_seconds, deadline=budget_s, eval_images=500, clock=lambda: now[0])
    return plan, now[0]


def test_slower_steps_get_fewer_iterations() -> None:
    (fast, fast_timing_s), (slow, slow_timing_s) = _plan({"big": 0.5, "small": 0.3}, 600), _plan(
        {"big": 0.8, "small": 0.5}, 600)
    assert fast.tier is TOP and slow.tier is TOP
    assert slow.num_iters < fast.num_iters
    # The predicted iterations fill the budget: timing + training + what comes after + start-up stay within it.
    for plan, timing_s in ((fast, fast_timing_s), (slow, slow_timing_s)):
        loop_step = plan.train_seconds / plan.num_iters  # the timed step with the loop's slowdown
        spent = timing_s + plan.train_seconds + plan.after_seconds + TRAIN_STARTUP_S
        assert loop_step > plan.step_seconds and spent <= 600 and spent > 600 - loop_step - 1e-9
        assert str(plan.num_iters) in plan.reason


def test_a_slow_machine_falls_back_to_the_cheaper_tier_and_a_fast_one_caps_at_the_maximum() -> None:
    timed: list[str] = []
    slow, _ = _plan({"big": 1.5, "small": 0.6}, 600, timed=timed)
    assert slow.tier is LOW and slow.num_iters >= LOW.min_iters
    assert "big" in slow.reason  # says why the better tier was dropped
    assert timed == ["small", "big"]  # big's extrapolation (0.6 x 0.8 x 1.82 = 0.87 s) might fit: it is timed
    fast, _ = _plan({"big": 0.05, "small": 0.03}, 600)
    assert fast.tier is TOP and fast.num_iters == TOP.max_iters and "maximum" in fast.reason


def test_a_tier_that_cannot_fit_even_when_extrapolated_optimistically_is_not_timed() -> None:
    timed: list[str] = []
    plan, timing_s = _plan({"big": 4.0, "small": 2.5}, 600, timed=timed)
    assert timed == ["small"] and timing_s == 3 * 2.5  # only the cheap tier's measurement spent budget
    assert plan.tier is LOW and "not timed" in plan.reason and "big" in plan.reason


def test_too_short_a_budget_still_trains_and_says_so() -> None:
    plan, _ = _plan({"big": 5.0, "small": 4.0}, 150)
    assert plan.tier is LOW and plan.num_iters == FEWEST_ITERS and "--time_budget" in plan.reason


def test_after_training_cost_grows_with_step_time_and_images() -> None:
    assert predicted_after_training_s(1.0, 8, 600) > predicted_after_training_s(0.5, 8, 600)
    assert predicted_after_training_s(1.0, 8, 600) > predicted_after_training_s(1.0, 8, 300)
    assert [t.image_size[0] * t.image_size[1] for t in TIERS] == sorted(
        (t.image_size[0] * t.image_size[1] for t in TIERS), reverse=True)  # best (largest) first


def test_autotune_picks_the_fastest_candidate_and_caches_per_machine(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ROCK_DIST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "cpu_bf16_instructions", lambda: "AMX")
    monkeypatch.setattr(autotune, "bf16_supported", lambda device: True)
    calls: list[str] = []
    fake = {"fp32": 2.0, "fp32 + channels_last": 1.5, "bf16 + channels_last": 0.7}

    def measure(model_config, loss_config, batch_size, candidate, device, *, steps):
        calls.append(candidate.label)
        return fake[candidate.label]

    cfg = ModelConfig(backbone="resnet18", pretrained="none", image_size=(128, 160))
    first = autotune.autotune_training_step(cfg, LossConfig(), 8, torch.device("cpu"), measure=measure)
    assert first.best.label == "bf16 + channels_last" and first.best_seconds == 0.7 and not first.cached
    assert first.best.train_flags() == ["--mixed_precision", "bf16", "--channels_last", "yes"]
    assert sorted(calls) == sorted(fake)
    again = autotune.autotune_training_step(cfg, LossConfig(), 8, torch.device("cpu"), measure=measure)
    assert again.cached and again.seconds == first.seconds and len(calls) == 3  # read from the cache
    # The same CPU model on a machine twice as slow today: the cached ranking stands, the winner is timed again.
    fake["bf16 + channels_last"] = 1.4
    slower = autotune.autotune_training_step(cfg, LossConfig(), 8, torch.device("cpu"), measure=measure,
                                             retime_best=True)
    assert slower.retimed and calls[3:] == ["bf16 + channels_last"] and slower.best_seconds == 1.4
    assert slower.seconds["fp32"] == 2.0  # the others stay as cached
    stored = autotune.autotune_training_step(cfg, LossConfig(), 8, torch.device("cpu"), measure=measure)
    assert stored.cached and stored.best_seconds == 1.4 and len(calls) == 4  # the fresh time replaced the cached
    calls[3:] = []
    other = autotune.autotune_training_step(cfg, LossConfig(), 4, torch.device("cpu"), measure=measure)
    assert not other.cached and len(calls) == 6  # another batch is another key
    monkeypatch.setattr(autotune, "cpu_bf16_instructions", lambda: "AVX512_BF16")  # e.g. AMD Zen 4: timed too
    assert "bf16 + channels_last" in [c.label for c in autotune.candidates(torch.device("cpu"))]
    monkeypatch.setattr(autotune, "cpu_bf16_instructions", lambda: None)  # emulated bf16 is not even timed
    assert [c.label for c in autotune.candidates(torch.device("cpu"))] == ["fp32", "fp32 + channels_last"]


def test_amx_detection_respects_the_onednn_isa_cap(monkeypatch) -> None:
    import rock_dist.perf.recipes as recipes

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert recipes.amx_available() is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert recipes.amx_available() == bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def test_bf16_instructions_come_from_the_cpu_flags_and_respect_the_isa_cap(monkeypatch) -> None:
    import rock_dist.engine.recipes as recipes

    monkeypatch.setattr(recipes, "amx_available", lambda: False)
    zen4 = frozenset({"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert recipes.cpu_bf16_instructions(zen4) == "AVX512_BF16"
    assert recipes.cpu_bf16_instructions(frozenset({"avx2", "avx512f", "avx512bw"})) is None  # Skylake-X: emulated
    assert recipes.cpu_bf16_instructions(frozenset({"fp", "asimd", "bf16"})) == "ARM_BF16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # how a Zen 4 imitates a Zen 3: bf16 instructions masked
    assert recipes.cpu_bf16_instructions(zen4) is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert recipes.cpu_bf16_instructions(zen4) is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert recipes.cpu_bf16_instructions(zen4) == "AVX512_BF16"
    monkeypatch.setattr(recipes, "amx_available", lambda: True)
    assert recipes.cpu_bf16_instructions(frozenset()) == "AMX"
    assert isinstance(recipes.cpu_flags(), frozenset)  # the real probe answers on any machine, never raises


def test_a_real_step_is_timed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ROCK_DIST_CACHE_DIR", str(tmp_path))
    cfg = ModelConfig(backbone="resnet18", pretrained="none", image_size=(64, 64), backbone_bn="train")
    seconds = autotune.measure_step_seconds(cfg, LossConfig(), 2, autotune.StepCandidate("fp32", False),
                                            torch.device("cpu"), steps=1)
    assert 0 < seconds < float("inf")
    with pytest.raises(ValueError):
        plan_training((), lambda tier: 1.0, deadline=10.0, eval_images=1)
