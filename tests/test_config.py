"""The typed config is the single source of flags: parsing, validation and round trips."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rock_dist.config import (POSTPROCESS_FIELDS, DetectConfig, EvaluateConfig, LossConfig, TrainConfig, build_parser,
                              from_dict, parse_config, resolve_postprocess, to_dict)


def test_defaults_match_reference_recipe() -> None:
    config = parse_config(TrainConfig, [])
    assert config.lr == 5e-5 and config.weight_decay == 2e-3
    assert config.data.batch_size == 8 and config.num_iters == 30000
    assert config.scheduler_milestones == (25000,) and config.scheduler_gamma == 0.1
    assert config.model.image_size == (480, 640) and config.model.backbone == "resnet50"
    assert config.model.tasks == ("scene", "depth", "normals")


def test_nested_fields_are_flat_flags_and_round_trip() -> None:
    argv = ["--aux_tasks", "depth", "scene", "--image_size", "240", "320", "--no_rock", "--batch_size", "4",
            "--scheduler_milestones", "10", "20", "--mixed_precision", "bf16"]
    config = parse_config(TrainConfig, argv)
    assert config.model.aux_tasks == ("depth", "scene")
    assert config.model.tasks == ()  # the baseline trains no auxiliary task
    assert config.model.image_size == (240, 320)
    assert config.data.batch_size == 4
    assert from_dict(TrainConfig, to_dict(config)) == config


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "1"], "at least 2 images"),
    (["--aux_tasks"], "--aux_tasks is empty"),
    (["--image_size", "32", "640"], "at least 64"),
    (["--scheduler_milestones", "20", "10"], "increasing"),
    (["--mixed_precision", "fp8"], "invalid choice"),
])
def test_bad_flags_exit_with_one_clear_message(argv: list[str], message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(TrainConfig, argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_field() -> None:
    text = build_parser(TrainConfig).format_help()
    for flag in ("--train_path", "--val_path", "--num_iters", "--no_rock", "--aux_tasks", "--writer_path",
                 "--checkpoint_path", "--gradient_accumulation_steps", "--mixed_precision", "--backbone"):
        assert flag in text


def test_positional_model_path() -> None:
    assert parse_config(EvaluateConfig, ["m.pt"]).model_path == "m.pt"
    assert parse_config(DetectConfig, ["w.pt", "--conf_threshold", "0.5"]).conf_threshold == 0.5
    with pytest.raises(SystemExit):
        parse_config(EvaluateConfig, [])


def test_unknown_flag_fails_in_a_real_process() -> None:
    result = subprocess.run([sys.executable, "-c", "from rock_dist.config import *; "
                             "parse_config(TrainConfig, ['--no_such_flag'])"], capture_output=True, text=True)
    assert result.returncode == 2 and "--no_such_flag" in result.stderr


@pytest.mark.parametrize("argv, flag", [
    (["--lr", "-0.001"], "--lr"), (["--lr", "nan"], "--lr"), (["--weight_decay", "-1"], "--weight_decay"),
    (["--scheduler_gamma", "0"], "--scheduler_gamma"), (["--clip_grad_norm", "-1"], "--clip_grad_norm"),
    (["--keep_checkpoints", "0"], "--keep_checkpoints"), (["--model_save_freq", "-5"], "--model_save_freq"),
    (["--scheduler_milestones", "0", "10"], "--scheduler_milestones"), (["--warmup_iters", "-1"], "--warmup_iters"),
])
def test_bad_numbers_are_one_line_naming_the_flag(argv: list[str], flag: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("python -m") or "error:" in message
    assert "error:" in message and flag in message


# ------------------------------------------------------------------------------------------------- config files
def test_config_file_gives_values_and_the_command_line_overrides_it(tmp_path) -> None:
    (tmp_path / "run.yaml").write_text("lr: 0.001\nnum_iters: 40\nchannels_last: no\n"
                                       "data:\n  batch_size: 4\n  train_path: /data/train\n"
                                       "model:\n  image_size: [240, 320]\n  aux_tasks: [depth]\n"
                                       "loss:\n  normals_weight: 10.0\n")
    config = parse_config(TrainConfig, ["--config", str(tmp_path / "run.yaml"), "--num_iters", "60"])
    assert config.lr == 0.001 and config.num_iters == 60  # the flag wins over the file
    assert config.data.batch_size == 4 and config.data.train_path == "/data/train"
    assert config.model.image_size == (240, 320) and config.model.aux_tasks == ("depth",)
    assert config.channels_last == "no"  # YAML's bare `no` is a boolean; the choice is meant
    assert config.loss.normals_weight == 10.0  # off the command line, but a config file may set it
    (tmp_path / "run.json").write_text('{"lr": 0.002, "scheduler_milestones": [5, 9]}')
    config = parse_config(TrainConfig, [f"--config={tmp_path / 'run.json'}"])
    assert config.lr == 0.002 and config.scheduler_milestones == (5, 9)
    # Every command takes one.
    (tmp_path / "detect.yaml").write_text("conf_threshold: 0.6\n")
    assert parse_config(DetectConfig, ["w.pt", "--config", str(tmp_path / "detect.yaml")]).conf_threshold == 0.6


def test_a_written_run_config_repeats_the_run(tmp_path) -> None:
    from rock_dist.config_file import RUN_CONFIG_NAME, write_config_file

    config = parse_config(TrainConfig, ["--lr", "3e-4", "--image_size", "128", "160", "--aux_tasks", "scene",
                                        "--val_path", "", "--scheduler_milestones", "7", "--mixed_precision", "bf16"])
    write_config_file(tmp_path / RUN_CONFIG_NAME, to_dict(config), "header line one\nline two")
    assert (tmp_path / RUN_CONFIG_NAME).read_text().startswith("# header line one\n# line two\n")
    assert parse_config(TrainConfig, ["--config", str(tmp_path)]) == config


@pytest.mark.parametrize("content, message", [
    ("lrr: 0.1\n", "unknown key 'lrr' (did you mean 'lr'?)"),
    ("lr: fast\n", "'lr': expected a number, got 'fast'"),
    ("num_iters: 2.5\n", "'num_iters': expected an integer"),
    ("mixed_precision: fp8\n", "'mixed_precision': expected one of auto, no, fp16, bf16"),
    ("image_size: [240]\n", "'image_size': expected a list of 2 values"),
    ("no_rock: 1\n", "'no_rock': expected true or false"),
    ("- lr\n- 0.1\n", "expected a mapping"),
    ("lr: [0.1\n", "not valid YAML"),
    ("lr: 0.1\ndata: {lr: 0.2}\n", "'lr' is given twice"),
])
def test_bad_config_files_are_one_message_naming_file_and_key(tmp_path, capsys, content: str,
                                                               message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, ["--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_missing_config_files_and_positional_keys_are_refused(tmp_path, capsys) -> None:
    for argv, message in ((["--config", str(tmp_path / "nope.yaml")], "nope.yaml does not exist"),
                          (["--config", str(tmp_path)], "directory without config.yaml")):
        with pytest.raises(SystemExit):
            parse_config(TrainConfig, argv)
        assert message in capsys.readouterr().err
    (tmp_path / "e.yaml").write_text("model_path: w.pt\n")
    with pytest.raises(SystemExit):
        parse_config(EvaluateConfig, ["w.pt", "--config", str(tmp_path / "e.yaml")])
    assert "positional" in capsys.readouterr().err


def test_help_is_grouped_by_concern() -> None:
    text = build_parser(TrainConfig).format_help()
    titles = {text.index(f"\n{title}:\n"): title for title in
              ("data", "model", "optimisation", "precision and performance", "logging and checkpoints", "distributed")}

    def section_of(flag: str) -> str:  # the section above the flag's help entry (not its place in the usage)
        at = text.index(f"\n  {flag} ")
        return titles[max(pos for pos in titles if pos < at)]

    for flag, title in (("--train_path", "data"), ("--backbone", "model"), ("--warmup_iters", "optimisation"),
                        ("--channels_last", "precision and performance"), ("--device", "precision and performance"),
                        ("--keep_checkpoints", "logging and checkpoints"), ("--dist_timeout", "distributed")):
        assert section_of(flag) == title, flag


@pytest.mark.parametrize("cls, argv, flag", [
    (TrainConfig, ["--nms_iou", "0"], "--nms_iou"), (TrainConfig, ["--score_threshold", "1"], "--score_threshold"),
    (TrainConfig, ["--conf_threshold", "nan"], "--conf_threshold"),
    (EvaluateConfig, ["m.pt", "--max_detections", "0"], "--max_detections"),
    (DetectConfig, ["w.pt", "--conf_threshold", "1.5"], "--conf_threshold"),
])
def test_bad_postprocess_flags_name_the_flag(cls: type, argv: list[str], flag: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(cls, argv)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err.strip().splitlines()[-1]


def test_postprocess_flags_override_the_saved_settings_only_when_given() -> None:
    saved = {"score_threshold": 0.2, "nms_iou": 0.5, "max_detections": 7, "conf_threshold": 0.9}
    names = ("conf_threshold", "nms_iou", "max_detections")
    plain = parse_config(DetectConfig, ["w.pt"])
    assert all(getattr(plain, name) is None for name in names)  # not given: None, not a default
    resolved = resolve_postprocess(saved, **{name: getattr(plain, name) for name in names})
    assert {name: getattr(resolved, name) for name in POSTPROCESS_FIELDS} == saved
    flagged = parse_config(DetectConfig, ["w.pt", "--nms_iou", "0.45"])
    resolved = resolve_postprocess(saved, **{name: getattr(flagged, name) for name in names})
    assert resolved.nms_iou == 0.45 and resolved.conf_threshold == 0.9 and resolved.max_detections == 7
    assert resolve_postprocess({}) == LossConfig()  # a file without settings: the defaults
    evaluate_help = build_parser(EvaluateConfig).format_help()
    assert "--score_threshold" in evaluate_help and "(default: None)" not in evaluate_help
