"""The loader-side checks of the data layer: the input-bound warning (times injected) and the data bench's scaling
table over worker and shard counts (real worker processes, real shards, tiny sizes)."""

from __future__ import annotations

from pathlib import Path

from rock_dist.data.sources import iter_shard, load_sources
from rock_dist.engine.loader_watch import LoaderWatch
from rock_dist.perf.data_bench import format_scaling, run_scaling


def _drive(watch: LoaderWatch, steps: int, wait: float, step: float) -> list[str]:
    messages, now = [], 0.0
    for _ in range(steps):
        watch.waited(wait)
        now += step
        message = watch.after_step(now)
        if message:
            messages.append(message)
    return messages


def test_loader_watch_warns_once_when_the_step_waits_for_data() -> None:
    watch = LoaderWatch(samples_per_step=8, num_workers=2, skip_steps=2, window_steps=4, threshold=0.2)
    messages = _drive(watch, 20, wait=0.5, step=1.0)  # half of every step spent waiting for the loader
    assert len(messages) == 1
    assert "waited for data 50 %" in messages[0] and "2 loader worker(s)" in messages[0]
    assert "delivered 8.0 img/s" in messages[0] and "alone takes 16.0 img/s" in messages[0]
    assert "--num_workers" in messages[0]


def test_loader_watch_stays_quiet_when_the_loader_keeps_up() -> None:
    watch = LoaderWatch(samples_per_step=8, num_workers=2, skip_steps=2, window_steps=4, threshold=0.2)
    assert _drive(watch, 20, wait=0.1, step=1.0) == []
    assert watch.done  # measured once, then no more bookkeeping


def test_scaling_table_runs_every_shard_and_worker_count(shard_dir: Path, tmp_path: Path) -> None:
    raws = [raw for src in load_sources(str(shard_dir / "train")) for sh in src.shards for raw in iter_shard(sh)]
    rows = run_scaling(raws, tmp_path, image_size=(64, 80), target=(4, 5), batch_size=2, seed=0, num_samples=4,
                       workers=(1, 2), shard_counts=(1, 4))
    assert [(r["shards"], r["workers"]) for r in rows] == [(1, 1), (1, 2), (4, 1), (4, 2)]
    assert all(r["mode"] == "indexed" and r["samples_per_s"] > 0 for r in rows)
    assert all(abs(r["samples_per_s_per_worker"] * r["workers"] - r["samples_per_s"]) < 1e-6 for r in rows)
    table = format_scaling(rows, 2)
    assert table.splitlines()[0].split() == ["shards", "1", "worker", "2", "workers"]
    assert len(table.splitlines()) == 5  # header, rule, two shard counts, the note
