"""Install metadata: pyproject.toml declares version ranges (torch and torchvision are not pinned, so rock_dist
installs beside a user's own CUDA build), .ci/constraints.txt pins the exact tested set, every pin lies in its
declared range, and CI installs with those pins and runs the linters. One console script per command, the version
in one place, py.typed shipped."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser under its old name
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _project() -> dict:
    return _pyproject()["project"]


def _declared(*extras: str) -> dict[str, Requirement]:
    project = _project()
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def _pins() -> dict[str, Version]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line  # a constraints file of exact versions
            pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def test_dependencies_are_ranges_with_lower_bounds() -> None:
    declared = _declared("test", "export", "fast-eval", "lint")
    for name in ("torch", "torchvision"):
        operators = {spec.operator for spec in declared[name].specifier}
        assert operators == {">="}, (name, str(declared[name].specifier))  # a floor, no pin, no ceiling
    for name, requirement in declared.items():
        assert not {"==", "==="} & {spec.operator for spec in requirement.specifier}, name
    assert "safetensors" in declared
    assert {"onnx", "onnxscript", "onnxruntime"} <= set(_declared("export")) - set(_declared())
    assert {"onnx", "onnxscript", "onnxruntime"} <= set(_declared("test"))  # CI runs the export tests
    # The trackers beyond TensorBoard are extras, off unless asked; CI checks a real MLflow store.
    assert {"wandb"} == set(_declared("wandb")) - set(_declared())
    assert {"mlflow-skinny"} == set(_declared("mlflow")) - set(_declared()) and "mlflow-skinny" in _declared("test")
    assert not {"wandb", "mlflow", "mlflow-skinny"} & set(_declared())


def test_constraints_pin_every_declared_dependency_inside_its_range() -> None:
    pins = _pins()
    for name, requirement in _declared("test", "export", "fast-eval", "lint").items():
        assert name in pins, f"{name} is not pinned in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, str(pins[name]))


def test_ci_installs_the_constraints_and_lints_before_the_tests() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "-c .ci/constraints.txt" in script and '-e ".[test,lint]"' in script
    assert {"ruff", "mypy"} == set(_declared("lint")) - set(_declared())
    steps = [script.index(step) for step in ("ruff check rock_dist tests", "mypy rock_dist",
                                             "python -m pytest -q -n 2 --durations=20")]
    assert steps == sorted(steps)


def test_lint_configuration() -> None:
    tool = _pyproject()["tool"]
    lint = tool["ruff"]["lint"]
    assert tool["ruff"]["line-length"] == 120
    assert {"E", "W", "F", "B", "BLE", "SIM115", "RUF100"} <= set(lint["select"])
    # Import sorting would move torch imports above the entry modules' early --help answer; lazy imports are
    # deliberate (fast --help, light modules).
    assert not {"I", "PLC", "PLC0415"} & set(lint["select"])
    assert tool["mypy"]["files"] == ["rock_dist"]


def test_console_scripts_run_the_python_m_commands() -> None:
    from rock_dist.scripts import SCRIPTS

    scripts = _project()["scripts"]
    assert set(scripts) == set(SCRIPTS)
    assert {"rock-train", "rock-shards", "rock-evaluate", "rock-detect", "rock-export", "rock-bench",
            "rock-quickstart", "rock-create-image-folder", "rock-rooms", "rock-data-bench"} == set(scripts)
    for name, target in scripts.items():
        module_name, _, attr = target.partition(":")
        function = getattr(importlib.import_module(module_name), attr)
        assert callable(function), target
        # Each script's module is a `python -m` entry point: a `main` run by `run_cli` under __main__ (read, not
        # imported: most of them import torch).
        spec = importlib.util.find_spec(SCRIPTS[name])
        assert spec is not None and spec.origin is not None, name
        tree = ast.parse(Path(spec.origin).read_text())
        assert any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body), name
        main_blocks = [ast.unparse(node) for node in tree.body if isinstance(node, ast.If)
                       and ast.unparse(node.test) == "__name__ == '__main__'"]
        assert any("run_cli(main" in block for block in main_blocks), name


def test_one_version_source() -> None:
    import rock_dist

    pyproject = _pyproject()
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "rock_dist.__version__"}
    assert Version(rock_dist.__version__)  # a valid version string
    assert not re.search(r"^\s*version\s*=\s*[\"']", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assigning = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "rock_dist").rglob("*.py"))
                 if re.search(r"^__version__\s*=", path.read_text(), re.MULTILINE)]
    assert assigning == ["rock_dist/__init__.py"]


def test_py_typed_is_shipped() -> None:
    marker = ROOT / "rock_dist" / "py.typed"
    assert marker.is_file() and marker.read_text() == ""
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["rock_dist"]
