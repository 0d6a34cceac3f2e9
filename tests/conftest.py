"""Shared pytest fixtures: a small random NYUv2 look-alike in the official layout, and shards built from it.

Session-scoped, so the whole suite builds them once (a fraction of a second). Owned by data-official; other test
files use `nyu_files` (paths + ground truth), `shard_dir` (OUT with train/val/test split directories) and
`partial_shard_dir` (a set without normals and with some scene types missing, for missing-modality tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from rock_dist.synthetic.official_layout import OfficialPaths, load_ground_truth, make_random_dataset

def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n N`) each worker gets its share of the cores for torch's threads, in this process and
    the commands it starts: two workers with two OpenMP threads each on a 2-core machine spun on each other's
    barriers (the learning test took 498 s instead of 127 s)."""
    import os

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The `slow` tests run first (stable order otherwise), so that under `-n 2` the long ones start at once and the
    short ones fill in around them instead of one long test finishing alone at the end. Tests marked `cuda` are
    skipped where no CUDA device is visible (every CPU machine, CI included): launch/gpu_check.sh runs them on a GPU
    machine with `-m cuda`."""
    import torch

    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (expected on a CPU machine; run by launch/gpu_check.sh)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


NYU_N = 24
NYU_HEIGHT, NYU_WIDTH = 48, 64
PARTIAL_MISSING_SCENE = (2, 5, 11)


@dataclass(frozen=True)
class NYUFiles:
    """A synthetic official dataset: the file paths and the generator's ground truth per image index."""

    paths: OfficialPaths
    ground_truth: dict[int, dict[str, Any]]
    n: int
    height: int
    width: int

    def build_argv(self, out: Path, *extra: str) -> list[str]:
        """Arguments of `python -m rock_dist.shards build` for these files into `out` (quiet, one worker)."""
        argv = ["build", "--dataset_path", str(self.paths.dataset_path), "--splits_path", str(self.paths.splits_path),
                "--out", str(out), "--num_workers", "1", "--no_progress"]
        argv += ["--normals_path", str(self.paths.normals_path)] if self.paths.normals_path else ["--no_normals"]
        if self.paths.val_split_path:
            argv += ["--val_split_path", str(self.paths.val_split_path)]
        return argv + list(extra)


def _make(root: Path, **kwargs: Any) -> NYUFiles:
    paths = make_random_dataset(root, NYU_N, kwargs.pop("seed", 0), NYU_HEIGHT, NYU_WIDTH, **kwargs)
    assert paths.ground_truth_path is not None
    return NYUFiles(paths, load_ground_truth(paths.ground_truth_path), NYU_N, NYU_HEIGHT, NYU_WIDTH)


@pytest.fixture(scope="session")
def nyu_files(tmp_path_factory: pytest.TempPathFactory) -> NYUFiles:
    """24 random 48x64 images with every modality, official splits and a val split."""
    return _make(tmp_path_factory.mktemp("nyu_official"), seed=0)


@pytest.fixture(scope="session")
def shard_dir(nyu_files: NYUFiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of `nyu_files` (4 samples per shard, JPEG RGB): a Path with train/, val/ and test/."""
    from rock_dist.shards import main

    out = tmp_path_factory.mktemp("shards") / "nyuv2"
    assert main(nyu_files.build_argv(out, "--samples_per_shard", "4")) == 0
    return out


@pytest.fixture(scope="session")
def partial_nyu_files(tmp_path_factory: pytest.TempPathFactory) -> NYUFiles:
    """Like `nyu_files` but without normals and with empty scene types for PARTIAL_MISSING_SCENE, no val split."""
    return _make(tmp_path_factory.mktemp("nyu_partial"), seed=1, with_normals=False, with_val=False,
                 missing_scene=PARTIAL_MISSING_SCENE)


@pytest.fixture(scope="session")
def partial_shard_dir(partial_nyu_files: NYUFiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of `partial_nyu_files`: no normals/mask members at all, no scene.cls for the scene-less images."""
    from rock_dist.shards import main

    out = tmp_path_factory.mktemp("shards_partial") / "partial"
    assert main(partial_nyu_files.build_argv(out, "--samples_per_shard", "5", "--dataset_name", "partial")) == 0
    return out


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps its state in class attributes; a test that trains in-process starts and ends without it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
