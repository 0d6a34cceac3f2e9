"""Every command answers --help without importing torch (so in well under 2 s on any machine: importing torch
alone takes 2-4 s on a 2-core CPU). Asserted on what was imported, not on the clock, so a slow machine passes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from numerics import HANG_GUARD_S

COMMANDS = ("train", "evaluate", "detect", "shards", "bench", "quickstart", "create_image_folder", "data.rooms",
            "perf.data_bench", "export")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_does_not_import_torch(command: str) -> None:
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", f"rock_dist.{command}", "--help"],
                            capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and "--" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "torch" not in imported, f"rock_dist.{command} --help imported torch"
