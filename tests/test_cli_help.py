"""Every command answers --help without importing torch (so in well under 2 s on any machine: importing torch
alone takes 2-4 s on a 2-core CPU). Asserted on what was imported, not on the clock, so a slow machine passes.
The console scripts (`rock-train`, ...; rock_dist/scripts.py) keep that, and their usage lines name the script."""

from __future__ import annotations

import subprocess
import sys

import pytest

from numerics import HANG_GUARD_S
from rock_dist import invocation

COMMANDS = ("train", "evaluate", "detect", "shards", "bench", "quickstart", "create_image_folder", "synthetic.rooms",
            "perf.data_bench", "export")


def _imported(importtime_stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in importtime_stderr.splitlines() if "|" in line}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_does_not_import_torch(command: str) -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", f"rock_dist.{command}", "--help"],
                            capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and "--" in result.stdout
    assert "torch" not in _imported(result.stderr), f"rock_dist.{command} --help imported torch"


def _run_script(function: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """The console script's entry point (`rock_dist.scripts:<function>`, what pip's wrapper calls) with `argv`."""
    code = f"import sys; sys.argv = {argv!r}; from rock_dist.scripts import {function}; {function}()"
    return subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)


# rock-export: a module that imports torch at the top (its --help is answered before); rock-shards build: a
# subcommand's usage line.
@pytest.mark.parametrize("function, argv, usage", [
    ("export", ["rock-export", "--help"], "usage: rock-export [-h]"),
    ("shards", ["rock-shards", "build", "--help"], "usage: rock-shards build [-h]"),
])
def test_console_script_help_names_the_script_and_does_not_import_torch(function: str, argv: list[str],
                                                                          usage: str) -> None:
    result = _run_script(function, argv)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(usage), result.stdout[:300]
    assert "torch" not in _imported(result.stderr), f"{argv[0]} --help imported torch"


def test_console_script_errors_are_one_line_with_the_exit_status() -> None:
    result = _run_script("shards", ["rock-shards", "frobnicate"])
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if "|" not in line] == [
        "error: unknown command 'frobnicate': use `build` or `verify` (see --help)"]


def test_command_words_name_the_console_script_of_that_module_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert invocation.command_name("rock_dist.train") == "python -m rock_dist.train"
    monkeypatch.setattr(invocation, "_console_script", ("rock-train", "rock_dist.train"))
    assert invocation.command_words("rock_dist.train") == ["rock-train"]
    assert invocation.command_name("rock_dist.shards") == "python -m rock_dist.shards"
