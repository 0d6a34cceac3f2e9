"""Task weighting strategies (engine.task_weighting): each update equals a hand computation, absent tasks keep
their weight, and the state round-trips through a checkpoint dict."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from rock_dist.engine.task_weighting import WEIGHTINGS, TaskWeighting, build_task_weighting

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
    def make() -> TaskWeighting:
        return build_task_weighting(name, TASKS, BASE, dwa_window=2)

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


# ------------------------------------------------------------------------------------------------ in the trainer
import os  # noqa: E402 - the trainer-level tests below need the launcher's environment
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from rock_dist.config import TrainConfig, parse_config  # noqa: E402
from rock_dist.engine import checkpoint as ckpt  # noqa: E402
from rock_dist.engine.trainer import BN_EVAL_ENV, RECORD_ENV, Trainer  # noqa: E402

from small_network import SMALL_NETWORK  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = [*SMALL_NETWORK, "--image_size", "64", "64", "--num_workers", "0",
         "--no_verbose", "--writer_path", "", "--coco_json_save_path", "", "--val_path", "", "--model_save_freq", "0",
         "--lr", "1e-4"]
ADAPTIVE = ["uncertainty", "dwa", "gradnorm"]


def _trainer(shard_dir: Path, save: Path, weighting: str, *extra: str) -> Trainer:
    cfg = parse_config(TrainConfig, [*SMALL, "--train_path", str(shard_dir / "train"), "--save_path", str(save),
                                     "--task_weighting", weighting, "--dwa_window", "1", "--task_weighting_lr", "0.05",
                                     *extra])
    return Trainer(cfg)


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ckpt.unwrap(trainer.model).state_dict().items()}


@pytest.mark.slow  # six short trainings
@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("weighting", ADAPTIVE)
def test_accumulation_gives_the_weights_and_model_of_the_large_batch(weighting: str, shard_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """1 process x batch 4 and 1 x batch 2 with accumulation 2, 3 steps on the same global batches: the weights
    agree to float summation order (rel 1e-6: every input of their update is a global-batch value), and so do the
    models (see the tolerance below). BatchNorm runs on running statistics (BN_EVAL_ENV): with batch statistics a batch
    of 4 and two of 2 are different functions."""
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv(BN_EVAL_ENV, "1")
    results = []
    for name, extra in (("big", ["--batch_size", "4"]), ("acc", ["--batch_size", "2",
                                                                 "--gradient_accumulation_steps", "2"])):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        trainer = _trainer(shard_dir, tmp_path / name, weighting, "--num_iters", "3", *extra)
        result = trainer.fit()
        results.append((result, _params(trainer)))
        del trainer
    (big, big_params), (acc, acc_params) = results
    assert big.task_weights is not None and big.task_weights.keys() == {"scene", "depth", "normals"}
    assert acc.task_weights == pytest.approx(big.task_weights, rel=1e-6)
    assert big.task_weights != {"scene": 3.0, "depth": 3.0, "normals": 30.0}  # they moved (DWA: at step 2)
    assert acc.losses == pytest.approx(big.losses, rel=1e-5)
    diffs = torch.cat([(acc_params[k].float() - big_params[k].float()).abs().reshape(-1) for k in big_params])
    # Adam moves an entry by about lr * sign(g) whatever |g| is, so an entry whose gradient is at float-noise level
    # may move the other way in one of the runs: at most 2 x lr per step for those, and few of them.
    assert diffs.max().item() <= 3 * 2 * 1e-4, diffs.max().item()
    assert (diffs > 1e-6).float().mean().item() < 0.01, (diffs > 1e-6).float().mean().item()


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("weighting", ADAPTIVE)
def test_a_step_without_depth_targets_leaves_the_depth_weight(weighting: str, shard_dir: Path,
                                                              tmp_path: Path) -> None:
    from rock_dist.data.loader_spec import TrainLoaderSpec
    from rock_dist.data.pipeline import make_train_loader

    trainer = _trainer(shard_dir, tmp_path, weighting, "--batch_size", "2", "--num_iters", "4")
    stream = iter(make_train_loader(TrainLoaderSpec(str(shard_dir / "train"), image_size=(64, 64),
                                                    target_size=trainer.target_size, batch_size=2, num_workers=0,
                                                    seed=0, rank=0, world_size=1)))
    trainer._train_mode()
    for step in (1, 2):  # DWA needs two window means before its weights move
        trainer.train_step([next(stream)], step=step)
    before = trainer.parts.weighting.weights()
    batch = dict(next(stream))
    batch["has_depth"] = torch.zeros_like(batch["has_depth"])
    values = trainer.train_step([batch], step=3)
    after = trainer.parts.weighting.weights()
    assert values["loss_depth"] == 0.0 and values["weight_depth"] == before["depth"]
    assert after["depth"] == before["depth"]
    assert after["scene"] != before["scene"] or after["normals"] != before["normals"]


@pytest.mark.slow  # three short trainings
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_resume_continues_the_weights_bit_identically(shard_dir: Path, tmp_path: Path) -> None:
    from accelerate.state import AcceleratorState, GradientState

    straight = _trainer(shard_dir, tmp_path / "straight", "gradnorm", "--batch_size", "2", "--num_iters", "4").fit()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    _trainer(shard_dir, tmp_path / "first", "gradnorm", "--batch_size", "2", "--num_iters", "2",
             "--model_save_freq", "2").fit()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    saved = dict(ckpt.periodic_checkpoints(tmp_path / "first"))[2]
    assert ckpt.read_checkpoint(saved)["task_weighting"]["name"] == "gradnorm"
    resumed = _trainer(shard_dir, tmp_path / "second", "gradnorm", "--batch_size", "2", "--num_iters", "4",
                       "--checkpoint_path", str(saved)).fit()
    assert resumed.task_weights == straight.task_weights
    assert resumed.digest == straight.digest
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    from rock_dist.errors import ConfigError

    # Refused before anything is built, naming the file (the path may come from --checkpoint_path auto).
    with pytest.raises(ConfigError, match=re.escape(f"--checkpoint_path {saved}: it was trained with --task_weighting "
                                                    "gradnorm but this run has uncertainty")):
        _trainer(shard_dir, tmp_path / "third", "uncertainty", "--batch_size", "2", "--num_iters", "4",
                 "--checkpoint_path", str(saved))


@pytest.mark.slow  # real 2-process launch
def test_two_processes_hold_the_same_weights_as_one_process_with_the_whole_batch(
        shard_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ROCK_DIST_", "ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", MAIN_PORT=str(port), **{RECORD_ENV: str(tmp_path / "rec"), BN_EVAL_ENV: "1"})
    argv = [*SMALL, "--train_path", str(shard_dir / "train"), "--task_weighting", "gradnorm",
            "--task_weighting_lr", "0.05", "--num_iters", "3"]
    proc = subprocess.run([str(REPO / "launch" / "cpu_2proc.sh"), *argv, "--batch_size", "2",
                           "--save_path", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = [json.loads((tmp_path / "rec" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["task_weights"] == records[1]["task_weights"]  # identical on every rank, exactly
    assert records[0]["digest"] == records[1]["digest"]
    one = subprocess.run([sys.executable, "-m", "rock_dist.train", *argv, "--batch_size", "4", "--cpu",
                          "--save_path", str(tmp_path / "one")],
                         env={**env, RECORD_ENV: str(tmp_path / "rec1")}, capture_output=True, text=True,
                         timeout=900, cwd=REPO)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    single = json.loads((tmp_path / "rec1" / "rank0.json").read_text())
    assert single["world_size"] == 1
    assert records[0]["task_weights"] == pytest.approx(single["task_weights"], rel=1e-6)
    # The first loss is the same function of the same weights (float summation order aside); the later ones follow
    # models that differ in the few noise-level entries Adam may move either way (see the accumulation test above).
    assert records[0]["losses"][0] == pytest.approx(single["losses"][0], rel=1e-6)
    assert records[0]["losses"] == pytest.approx(single["losses"], rel=1e-4)
    # And the models after the 3 steps, with the in-process test's tolerance (Adam's noise-level entries).
    two = torch.load(tmp_path / "two" / ckpt.FINAL_WEIGHTS_NAME, weights_only=True)["model"]
    one = torch.load(tmp_path / "one" / ckpt.FINAL_WEIGHTS_NAME, weights_only=True)["model"]
    diffs = torch.cat([(two[k].float() - one[k].float()).abs().reshape(-1) for k in one])
    assert diffs.max().item() <= 3 * 2 * 1e-4 and (diffs > 1e-6).float().mean().item() < 0.01
