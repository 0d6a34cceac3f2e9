"""In-process tests (one process, CPU) of the training options around the loop: experiment trackers through
Accelerate (`--report_to`: real TensorBoard event files and a real MLflow file store), the EMA of the weights
(`--ema_decay`), early stopping on val AP (`--early_stopping_patience`) and `--checkpoint_path auto`.

Model: resnet18, input 128x160, --pretrained none, batch 2, on the conftest's synthetic shards (`shard_dir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch

from rock_dist.config import TrainConfig, parse_config
from rock_dist.engine import checkpoint as ckpt
from rock_dist.engine.ema import ModelEma
from rock_dist.engine.trainer import BN_EVAL_ENV, Trainer, train
from rock_dist.errors import ConfigError

from small_network import SMALL_NETWORK

SMALL = [*SMALL_NETWORK, "--image_size", "128", "160", "--num_workers", "0",
         "--no_verbose", "--batch_size", "2", "--coco_json_save_path", "", "--model_save_freq", "0"]


@pytest.fixture(autouse=True)
def clean_state(fresh_accelerate_state: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("ROCK_DIST_FAULT_NONFINITE", "ROCK_DIST_RECORD_DIR", "ACCELERATE_MIXED_PRECISION", "WORLD_SIZE",
                "MLFLOW_TRACKING_URI", BN_EVAL_ENV):
        monkeypatch.delenv(var, raising=False)
    yield


def _reset_accelerate() -> None:
    """Between two runs in one test (each builds its own Accelerator on Accelerate's process-wide state)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_cfg(shard_dir: Path, save: Path, *extra: str, val: bool = False) -> TrainConfig:
    return parse_config(TrainConfig, [*SMALL, "--train_path", str(shard_dir / "train"),
                                      "--val_path", str(shard_dir / "val") if val else "", "--save_path", str(save),
                                      "--writer_path", "", *extra])


# -------------------------------------------------------------------------------------------------- trackers
@pytest.mark.slow  # trainings with three trackers
def test_tensorboard_and_mlflow_get_config_scalars_and_pictures(shard_dir: Path, tmp_path: Path) -> None:
    """One run reporting to TensorBoard and to an MLflow file store: both get the flags as hyper-parameters, the
    training scalars, the val metrics of the raw and the EMA weights, and the prediction pictures."""
    mlflow = pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    tb, store = tmp_path / "tb", (tmp_path / "mlruns").as_uri()
    cfg = make_cfg(shard_dir, tmp_path / "run", "--num_iters", "2", "--report_to", "tensorboard", "mlflow",
                   "--writer_path", str(tb), "--mlflow_tracking_uri", store, "--tracker_project", "rock_test",
                   "--train_eval_freq", "1", "--image_to_tb_freq", "2", "--val_eval_freq", "2", "--ema_decay", "0.5",
                   "--lr", "0.0001", val=True)
    result = train(cfg)
    assert result.step == 2 and result.metrics is not None and result.ema_metrics is not None

    events = EventAccumulator(str(tb), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/loss_det", "train/lr", "train/images_per_s", "val/AP", "val/AP50",
                "val_ema/AP", "val_ema/AP50"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert events.Scalars("val/AP")[0].value == pytest.approx(result.metrics["AP"])
    assert events.Scalars("val_ema/AP")[0].value == pytest.approx(result.ema_metrics["AP"])
    images = set(events.Tags()["images"])
    for tag in ("images/detections", "images/ground_truth", "images/depth_pred", "images/normals_pred"):
        assert tag in images, tag
    # add_hparams writes the hyper-parameters into a run directory of its own under the log directory.
    hparams = {}
    for run_dir in (d for d in tb.iterdir() if d.is_dir() and any(d.glob("events.*"))):
        run = EventAccumulator(str(run_dir))
        run.Reload()
        content = run.PluginTagToContent("hparams").get("_hparams_/session_start_info")
        if content is not None:
            info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
            hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}
    assert hparams["lr"] == pytest.approx(1e-4) and hparams["backbone"] == "resnet18"
    assert hparams["image_size"] == "128 160" and hparams["ema_decay"] == pytest.approx(0.5)
    assert hparams["run/world_size"] == 1 and hparams["report_to"] == "tensorboard mlflow"

    client = mlflow.MlflowClient(tracking_uri=store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "rock_test"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.0001" and run.data.params["aux_tasks"] == "scene depth normals"
    for key in ("train/loss", "train/lr", "val/AP", "val_ema/AP"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert run.data.metrics["val/AP"] == pytest.approx(result.metrics["AP"])
    pictures = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "images/step0000002")}
    assert {"detections.png", "ground_truth.png", "depth_pred.png", "normals_gt.png"} <= pictures
    from PIL import Image

    local = client.download_artifacts(run.info.run_id, "images/step0000002/detections.png", str(tmp_path / "dl"))
    with Image.open(local) as picture:
        assert picture.mode == "RGB" and picture.height > 128  # a grid of 128 x 160 pictures


def test_tracker_flags_are_checked_before_training(shard_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in ((["--report_to", "comet"], "argument --report_to: invalid choice: 'comet'"),
                          (["--report_to", "none", "tensorboard"], "'none' cannot be combined")):
        with pytest.raises(SystemExit) as exit_info:
            parse_config(TrainConfig, argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: the missing-package message cannot be shown")
    from rock_dist.train import main

    with pytest.raises(ConfigError, match=r"^--report_to wandb: the wandb package is not installed; pip install "
                                          r"'rock_dist\[wandb\]'"):
        main([*SMALL, "--train_path", str(shard_dir / "train"), "--val_path", "", "--save_path",
              str(tmp_path / "w"), "--report_to", "tensorboard", "wandb"])
    assert not (tmp_path / "w").exists()  # stopped before the run wrote anything


# -------------------------------------------------------------------------------------------------- EMA
def test_ema_update_is_timm_model_ema_v2() -> None:
    """decay * ema + (1 - decay) * model for every float entry of the state dict, BatchNorm running statistics
    included; integer buffers copied; the copy is in eval mode without gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    ema = ModelEma.copy_of(model, 0.75)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(2, 3, 8, 8))  # train mode: moves the running statistics, counts a batch
    ema.update(model)
    after, now = ema.module.state_dict(), model.state_dict()
    for name, value in after.items():
        if value.is_floating_point():
            assert not torch.equal(now[name], before[name]), name  # the check below is not vacuous
            assert torch.allclose(value, 0.75 * before[name] + 0.25 * now[name], rtol=1e-6, atol=1e-7), name
        else:
            assert torch.equal(value, now[name]), name
    assert "1.running_var" in after and int(after["1.num_batches_tracked"]) == 1
    with pytest.raises(ValueError, match="decay"):
        ModelEma(model, 1.0)


@pytest.mark.slow  # four short trainings
def test_ema_and_auto_resume_continue_exactly(shard_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """4 iterations straight == 2 iterations started with `--checkpoint_path auto` on an empty save directory (a
    fresh start), then `--checkpoint_path auto` again up to 4: losses, weights and EMA weights bit-identical. Every
    checkpoint of the straight run carries the EMA, which follows ema_k = d ema_(k-1) + (1 - d) w_k."""
    common = ["--ema_decay", "0.5", "--num_workers", "1", "--keep_checkpoints", "5"]
    straight = train(make_cfg(shard_dir, tmp_path / "straight", *common, "--num_iters", "4", "--model_save_freq",
                              "1"))
    saved = dict(ckpt.periodic_checkpoints(tmp_path / "straight"))
    assert sorted(saved) == [1, 2, 3, 4]
    for step in (2, 3, 4):
        previous, current = ckpt.read_checkpoint(saved[step - 1]), ckpt.read_checkpoint(saved[step])
        assert current["ema_decay"] == 0.5
        for name, value in current["ema"].items():
            if value.is_floating_point():
                expected = 0.5 * previous["ema"][name] + 0.5 * current["model"][name]
                assert torch.allclose(value, expected, rtol=1e-6, atol=1e-7), (step, name)
    ema_final = ckpt.read_checkpoint(straight.final_ema_weights)["model"]
    assert straight.final_ema_weights.name == "weights_final_ema.pt"
    assert straight.final_ema_weights.with_suffix(".safetensors").is_file()
    assert all(torch.equal(ema_final[k], v) for k, v in ckpt.read_checkpoint(saved[4])["ema"].items())
    raw_final = ckpt.read_checkpoint(straight.final_weights)["model"]
    assert any(not torch.equal(raw_final[k], ema_final[k]) for k in raw_final)  # really an average
    model, _, _ = ckpt.load_model(straight.final_ema_weights)  # an ordinary weights file
    assert all(torch.equal(v, ema_final[k]) for k, v in model.state_dict().items())

    _reset_accelerate()
    capsys.readouterr()
    first = train(make_cfg(shard_dir, tmp_path / "parts", *common, "--num_iters", "2", "--checkpoint_path", "auto"))
    assert first.step == 2 and first.losses == straight.losses[:2]
    assert f"--checkpoint_path auto: no checkpoint in {tmp_path / 'parts'}; starting fresh" in capsys.readouterr().out
    _reset_accelerate()
    resumed = train(make_cfg(shard_dir, tmp_path / "parts", *common, "--num_iters", "4", "--checkpoint_path",
                             "auto"))
    assert resumed.step == 4 and resumed.losses == straight.losses[2:]
    assert resumed.digest == straight.digest
    resumed_ema = ckpt.read_checkpoint(resumed.final_ema_weights)["model"]
    assert all(torch.equal(resumed_ema[k], v) for k, v in ema_final.items())


# -------------------------------------------------------------------------------------------------- early stopping
@pytest.mark.slow  # 2-process trainings and a resume
def test_early_stopping_stops_every_rank_and_its_count_survives_resume(shard_dir: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A network that does not change (lr 1e-12, every BatchNorm on its running statistics) has the same val AP at
    every validation: with patience 2 the run stops after the third, writes a checkpoint and the final weights there,
    and a resume keeps the count (the same patience trains nothing more; patience 3 allows exactly one more)."""
    monkeypatch.setenv(BN_EVAL_ENV, "1")
    save = tmp_path / "run"
    common = ["--lr", "1e-12", "--val_eval_freq", "1", "--num_iters", "8", "--writer_path", str(tmp_path / "tb")]
    result = train(make_cfg(shard_dir, save, *common, "--early_stopping_patience", "2", val=True))
    assert result.early_stopped and result.step == 3 and len(result.losses) == 3
    out = capsys.readouterr().out
    assert "early stopping: val AP has not improved for 2 validation(s)" in out
    assert "stopping at iteration 3 of 8" in out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/AP")] == [1, 2, 3]
    assert len({e.value for e in events.Scalars("val/AP")}) == 1  # the premise: no validation improved
    (step, path), = ckpt.periodic_checkpoints(save)
    stored = ckpt.read_checkpoint(path)
    assert step == 3 and stored["evals_since_best"] == 2 and stored["best_step"] == 1
    assert result.final_weights is not None and ckpt.read_checkpoint(result.final_weights)["model"].keys()

    _reset_accelerate()
    again = train(make_cfg(shard_dir, save, *common, "--early_stopping_patience", "2", "--checkpoint_path", "auto",
                           val=True))
    assert again.early_stopped and again.step == 3 and again.losses == []
    assert "nothing left to train" in capsys.readouterr().out
    _reset_accelerate()
    longer = train(make_cfg(shard_dir, save, *common, "--early_stopping_patience", "3", "--checkpoint_path", "auto",
                            val=True))
    # The count went on from 2: one more validation without improvement (a fresh count would stop at 7).
    assert longer.early_stopped and longer.step == 4 and len(longer.losses) == 1


def test_early_stopping_needs_validation_during_training(shard_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, ["--early_stopping_patience", "3"])
    assert exit_info.value.code == 2 and "--early_stopping_patience 3 counts validations during training: give " \
                                         "--val_eval_freq" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--early_stopping_patience 3: there is no validation split"):
        Trainer(make_cfg(shard_dir, tmp_path, "--early_stopping_patience", "3", "--val_eval_freq", "5"))
