"""The run plan (rock_dist.engine.run_plan) and the flags it is made from.

- the plan is frozen, and train, evaluate and detect resolve the same device and precision for the same flags;
- every field of every command's config dataclass is read by the code that consumes that config: a flag nothing
  reads does nothing (as --color_jitter once did). The check is static (the attribute reads and field-name strings
  of the modules that use the config class), so it covers every command at once; tests/test_train.py's
  test_every_training_flag_is_read_by_the_engine checks the training flags dynamically, during a real run.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import rock_dist
from rock_dist import config as config_module
from rock_dist.config import BenchConfig, DetectConfig, EvaluateConfig, TrainConfig, parse_config
from rock_dist.engine.run_plan import Postprocess, RunPlan, resolve_run_plan
from rock_dist.errors import ConfigError

PACKAGE = Path(rock_dist.__file__).parent
# The config machinery itself (parsing, validation, files): its reads are no use of a flag.
NOT_CONSUMERS = {"config.py", "config_file.py"}


# ------------------------------------------------------------------------------------------------------ the plan
def test_run_plan_is_frozen() -> None:
    plan = RunPlan(device="cpu", precision="fp32", batch_size=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.batch_size = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.postprocess.nms_iou = 0.5  # type: ignore[misc]
    changed = plan.with_batch_size(6, "auto")
    assert (plan.batch_size, plan.batch_origin) == (4, "flag") and (changed.batch_size, changed.batch_origin) == \
        (6, "auto")


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("flags", [[], ["--device", "cpu"], ["--mixed_precision", "bf16"],
                                   ["--mixed_precision", "no"], ["--device", "cpu", "--mixed_precision", "bf16"]])
def test_train_evaluate_and_detect_resolve_the_same_device_and_precision(
        flags: list[str], cuda: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """One resolution for every command: the same flags give the same device and precision (detect has no
    precision flag and always runs fp32)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr("rock_dist.engine.run_plan.dataset_vocabulary", lambda path: (["a"], ["s"]))
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    train = resolve_run_plan(parse_config(TrainConfig, flags))
    evaluate = resolve_run_plan(parse_config(EvaluateConfig, ["model.pt", *flags]))
    device_flags = [f for f in flags if f in ("--device", "cpu")]
    detect = resolve_run_plan(parse_config(DetectConfig, ["model.pt", *device_flags]))
    assert train.device == evaluate.device == detect.device == ("cuda" if cuda and "cpu" not in flags else "cpu")
    assert train.precision == evaluate.precision and detect.precision == "fp32"
    assert train.precision in ("fp32", "bf16", "fp16")  # one vocabulary: never Accelerate's "no"
    # The launcher forcing the CPU wins over 'auto' everywhere alike.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert resolve_run_plan(parse_config(TrainConfig, [])).device == \
        resolve_run_plan(parse_config(EvaluateConfig, ["model.pt"])).device == \
        resolve_run_plan(parse_config(DetectConfig, ["model.pt"])).device == "cpu"


def test_the_layout_comes_from_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from rock_dist.engine.run_plan import check_layout, launcher_layout

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "3")  # a scheduler's stray RANK without a launcher: one process
    assert launcher_layout() == (1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launcher_layout() == (4, 3)
    plan = RunPlan(device="cpu", precision="fp32", world_size=4, rank=3)
    check_layout(plan, SimpleNamespace(num_processes=4, process_index=3, distributed_type="MULTI_CPU"))
    with pytest.raises(ConfigError, match="rank 2 of 4, but the launcher said rank 3 of 4"):
        check_layout(plan, SimpleNamespace(num_processes=4, process_index=2, distributed_type="MULTI_CPU"))


def test_inference_refuses_fp16_on_the_cpu_and_the_bench_takes_the_fast_recipe(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_run_plan(parse_config(EvaluateConfig, ["model.pt", "--mixed_precision", "fp16"]))
    with pytest.raises(ConfigError, match="--batch_size 0"):
        resolve_run_plan(parse_config(DetectConfig, ["model.pt", "--batch_size", "0"]))
    from rock_dist.perf.recipes import fast_recipe

    bench = resolve_run_plan(parse_config(BenchConfig, []))
    fast = fast_recipe("cpu")
    assert (bench.device, bench.precision, bench.compile, bench.batch_size) == \
        ("cpu", fast.precision, fast.compile, fast.batch_size)
    forced = resolve_run_plan(parse_config(BenchConfig, ["--precision", "fp32", "--compile", "yes",
                                                         "--batch_size", "4"]))
    assert (forced.precision, forced.compile, forced.batch_size) == ("fp32", True, 4)


def test_weights_complete_an_inference_plan() -> None:
    from rock_dist.config import ModelConfig

    plan = resolve_run_plan(parse_config(DetectConfig, ["model.pt", "--device", "cpu", "--nms_iou", "0.5"]))
    meta = {"postprocess": {"nms_iou": 0.4, "conf_threshold": 0.6}, "class_names": ["a", "b"], "scene_types": []}
    done = plan.with_weights(ModelConfig(backbone="resnet18", image_size=(128, 160), num_classes=3), meta,
                             {"conf_threshold": None, "nms_iou": 0.5, "max_detections": None},
                             default_names=(["x"], ["kitchen"]))
    # The flag wins, then the file, then the default; the file's names, the defaults where it has none.
    assert done.postprocess == Postprocess(nms_iou=0.5, conf_threshold=0.6)
    assert done.class_names == ("a", "b") and done.scene_types == ("kitchen",)
    from rock_dist.model.priors import feature_map_sizes

    assert done.image_size == (128, 160)
    assert done.target_size == tuple(feature_map_sizes((128, 160), "resnet18")[0]) == (8, 10)  # the priors' first map


# ------------------------------------------------------------------------------------------- every flag is read
def _config_classes() -> list[type]:
    return [obj for obj in vars(config_module).values()
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == config_module.__name__]


def _containers(cls: type, classes: list[type]) -> set[str]:
    """Names of `cls` and of every config class that holds it (directly or further up), e.g. DataConfig and
    TrainConfig: code reading `cfg.data.x` names TrainConfig, not DataConfig."""
    names = {cls.__name__}
    changed = True
    while changed:
        changed = False
        for other in classes:
            if other.__name__ in names:
                continue
            hints = {f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(other)}
            if hints & names:
                names.add(other.__name__)
                changed = True
    return names


# Tuples of field names that rock_dist.config exports for reading fields by name (e.g. POSTPROCESS_FIELDS).
NAME_TUPLES = {name: value for name, value in vars(config_module).items()
               if name.isupper() and isinstance(value, tuple) and all(isinstance(v, str) for v in value)}


def _reads(source: str) -> set[str]:
    """Attribute names a module reads, and the field names it reads by name: its string constants (`getattr(cfg,
    name)` over a tuple of names, "--flag" strings) and the members of config's name tuples it uses."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value.removeprefix("--"))
        elif isinstance(node, ast.Name) and node.id in NAME_TUPLES:
            found.update(NAME_TUPLES[node.id])
        elif isinstance(node, ast.JoinedStr):
            found.update(_task_template_reads(node))
    return found


def _task_template_reads(node: ast.JoinedStr) -> set[str]:
    """A per-task field read by name, f"{task.name}_weight" or f"--{task}_output_path": the template filled in with
    every auxiliary task the command line knows (config.AUX_TASKS), the only values such a placeholder takes for a
    config field."""
    parts = list(node.values)
    prefix = parts.pop(0).value if parts and isinstance(parts[0], ast.Constant) else ""
    if len(parts) != 2 or not isinstance(parts[0], ast.FormattedValue) or not isinstance(parts[1], ast.Constant):
        return set()
    return {f"{prefix}{task}{parts[1].value}".removeprefix("--") for task in config_module.AUX_TASKS}


def unread_config_fields(package: Path = PACKAGE) -> dict[str, list[str]]:
    """{config class: its fields that no module using the class reads}."""
    sources = {p: p.read_text() for p in package.rglob("*.py") if p.name not in NOT_CONSUMERS}
    classes = _config_classes()
    unread: dict[str, list[str]] = {}
    for cls in classes:
        names = _containers(cls, classes)
        consumers = [p for p, text in sources.items() if any(name in text for name in names)]
        reads = set().union(*(_reads(sources[p]) for p in consumers)) if consumers else set()
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in reads]
        if missing:
            unread[cls.__name__] = missing
    return unread


def test_every_config_field_is_read_by_its_command() -> None:
    assert len(_config_classes()) >= 15  # every command's config (and the nested training ones) is checked
    assert unread_config_fields() == {}


def test_the_field_check_finds_an_unread_field(tmp_path: Path) -> None:
    """The check fails for a field that nothing reads: a copy of the package with one added to EvaluateConfig."""
    import shutil

    copy = tmp_path / "rock_dist"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    evaluate = copy / "evaluate.py"
    # The check reads the config classes from rock_dist.config; a field is added to the consumer side's view by
    # removing the one read of a real field instead (the same situation: a field that nothing uses).
    text = evaluate.read_text()
    assert "cfg.show_all_cats" in text
    evaluate.write_text(text.replace("cfg.show_all_cats", "False"))
    assert unread_config_fields(copy) == {"EvaluateConfig": ["show_all_cats"]}
    # The same for a field read through a per-task template: without the template nothing reads the weights.
    base = copy / "tasks" / "base.py"
    assert 'f"{self.name}_weight"' in base.read_text()
    base.write_text(base.read_text().replace('f"{self.name}_weight"', '"unused"'))
    assert unread_config_fields(copy)["LossConfig"] == [f"{t}_weight" for t in config_module.AUX_TASKS]
