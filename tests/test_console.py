"""The training console: an ETA from the first step, and evaluation progress of its own (plain and Rich)."""

from __future__ import annotations

import io
import re

from rock_dist.engine.console import EvalProgress, TrainConsole


def test_plain_lines_show_an_eta_from_the_first_step() -> None:
    out = io.StringIO()
    with TrainConsole(enabled=True, verbose=True, total_steps=100, start_step=0, log_every=50, stream=out,
                      force_plain=True) as console:
        console.update(1, {"loss": 2.0}, 1e-3, 0.5, 4.0)
    first = out.getvalue().splitlines()[0]
    assert first.startswith("step 1/100") and re.search(r"eta \d+:\d\d:\d\d", first), first


def test_rich_bar_has_our_eta_and_hosts_the_evaluation_task() -> None:
    out = io.StringIO()
    with TrainConsole(enabled=True, verbose=True, total_steps=10, start_step=0, log_every=5, stream=out,
                      force_plain=False) as console:
        console.update(1, {"loss": 2.0}, 1e-3, 0.5, 4.0)
        assert console.eta_seconds(1) >= 0
        # Rich allows one live display: the validation becomes a task of the training bar instead of a second one.
        with EvalProgress("validating", 20, enabled=True, inside=console) as progress:
            progress.advance(8)
            assert progress.done == 8 and progress.eta_seconds() >= 0
        assert len(console._progress.tasks) == 1  # the evaluation task is removed again
    assert "train" in out.getvalue()


def test_plain_evaluation_progress_prints_start_tenths_and_end() -> None:
    out = io.StringIO()
    with EvalProgress("evaluating", 100, enabled=True, stream=out, force_plain=True) as progress:
        for _ in range(10):
            progress.advance(10)
    lines = out.getvalue().splitlines()
    assert lines[0] == "evaluating: started (100 images)"
    assert any(re.match(r"evaluating: \d+/100 images, [\d.]+ img/s, eta ", line) for line in lines)
    assert lines[-1].startswith("evaluating: 100 images in")
    quiet = io.StringIO()
    with EvalProgress("evaluating", 100, enabled=False, stream=quiet) as progress:
        progress.advance(100)
    assert quiet.getvalue() == ""
