"""Install metadata: pyproject.toml declares version ranges (torch and torchvision are not pinned, so rock_dist
installs beside a user's own CUDA build), .ci/constraints.txt pins the exact tested set, every pin lies in its
declared range, and CI installs with those pins."""

from __future__ import annotations

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


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


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
    declared = _declared("test", "export", "fast-eval")
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
    for name, requirement in _declared("test", "export", "fast-eval").items():
        assert name in pins, f"{name} is not pinned in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, str(pins[name]))


def test_ci_installs_the_constraints() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "-c .ci/constraints.txt" in script and '-e ".[test]"' in script
