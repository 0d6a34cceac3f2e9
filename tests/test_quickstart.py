"""The quickstart's own decisions: launcher layout, CPU speed flags, NYUv2 file checks (the full run is the README's
main command; its learning is covered by test_learning.py on the same public commands)."""

from __future__ import annotations

import re

import pytest

from rock_dist import quickstart
from rock_dist.config import QuickstartConfig, parse_config
from rock_dist.errors import ConfigError


def test_speed_flags_follow_the_autotune_on_a_cpu_and_the_train_defaults_on_cuda(monkeypatch) -> None:
    from rock_dist.perf.autotune import StepCandidate

    best = StepCandidate("bf16", True)
    monkeypatch.setattr(quickstart, "_has_cuda", lambda: False)
    assert quickstart._speed_flags(best) == ("--mixed_precision", "bf16", "--channels_last", "yes")
    assert quickstart._speed_flags(StepCandidate("fp32", False)) == ("--mixed_precision", "no", "--channels_last",
                                                                      "no")
    monkeypatch.setattr(quickstart, "_has_cuda", lambda: True)
    assert quickstart._speed_flags(best) == ()


def test_cpu_layouts_start_the_requested_processes() -> None:
    one = quickstart._layout(gpus=0, num_processes=0)
    assert one[:2] == ["--cpu", "--num_machines"] and one[one.index("--num_processes") + 1] == "1"
    two = quickstart._layout(gpus=0, num_processes=2)
    # `--cpu --num_processes 2` starts one process, so two CPU processes go through --multi_gpu + --cpu
    # (docs/training.md).
    assert two[0] == "--multi_gpu" and two[two.index("--num_processes") + 1] == "2" and two[-1] == "--cpu"
    gpus = quickstart._layout(gpus=4, num_processes=0)
    assert gpus[0] == "--multi_gpu" and gpus[gpus.index("--num_processes") + 1] == "4"


def test_missing_nyuv2_files_are_named(tmp_path) -> None:
    (tmp_path / "splits.mat").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        quickstart._official_files(tmp_path)
    message = str(err.value)
    assert "nyu_depth_v2_labeled.mat" in message and "normals_gt" in message and "splits.mat" not in message


def test_defaults_render_tinted_rooms_and_size_the_run_to_a_budget() -> None:
    cfg = parse_config(QuickstartConfig, [])
    assert 0 < cfg.class_tint <= 1 and 0 < cfg.train_fraction < 1
    assert cfg.num_iters == 0 and cfg.image_size == (0, 0) and 0 < cfg.time_budget <= 600  # the README's 10 minutes
    with pytest.raises(SystemExit):
        parse_config(QuickstartConfig, ["--class_tint", "x"])


def test_rooms_are_rendered_with_the_quickstart_difficulty_flags(monkeypatch, tmp_path) -> None:
    # The rooms' difficulty flags reach the renderer's command line (and are valid flags of it).
    commands: list[list[str]] = []

    class Stop(Exception):
        pass

    def record(step: str, args, env=None) -> float:
        commands.append(list(args))
        raise Stop

    monkeypatch.setattr(quickstart, "_run", record)
    with pytest.raises(Stop):
        quickstart.main(["--workdir", str(tmp_path), "--min_object_area", "0.05", "--camera_distance", "1.2",
                         "--max_object_area", "0.6"])
    render = commands[0]
    assert render[1:3] == ["-m", "rock_dist.synthetic.rooms"]
    assert render[render.index("--min_object_area") + 1] == "0.05"
    assert render[render.index("--camera_distance") + 1] == "1.2"
    assert render[render.index("--max_object_area") + 1] == "0.6"
    cfg = parse_config(QuickstartConfig, [])
    assert cfg.min_object_area > 0 and cfg.camera_distance > 0  # the easier rooms are the default
    from rock_dist.config import RoomsConfig

    rooms = parse_config(RoomsConfig, ["--out", "x", *render[render.index("--min_object_area"):]])
    assert (rooms.min_object_area, rooms.camera_distance, rooms.max_object_area) == (0.05, 1.2, 0.6)


@pytest.mark.slow  # four tiny trainings end to end
def test_compare_weightings_trains_each_weighting_and_tabulates_their_final_weights(tmp_path, capsys) -> None:
    assert quickstart.main(["--workdir", str(tmp_path), "--num_images", "40", "--render_size", "48", "64",
                            "--num_iters", "3", "--image_size", "64", "64", "--batch_size", "2", "--lr", "0.0002",
                            "--compare_weightings"]) == 0
    out = capsys.readouterr().out
    assert "ROCK task weightings, same budget" in out
    assert re.search(r"pictures: (\d+ boxes drawn at score >= 0\.4 on \d+ test images; \d+ % lie on an object|no box)",
                     out)  # the closing summary says what the drawn boxes get right
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│ rock_")}
    assert sorted(rows) == ["rock_dwa", "rock_fixed", "rock_gradnorm", "rock_uncertainty"]
    assert rows["rock_fixed"].rstrip(" │").endswith("3 / 3 / 30")  # fixed weights stay the reference's
    assert not rows["rock_uncertainty"].rstrip(" │").endswith("3 / 3 / 30")  # learned ones moved
    for name in rows:
        assert (tmp_path / "runs" / name / "eval" / "metrics.json").is_file()
    with pytest.raises(SystemExit):
        parse_config(QuickstartConfig, ["--compare_weightings", "--no_rock"])
