"""What survives what: real 2-process launches (gloo, `launch/cpu_2proc.sh`) under the faults a cluster produces.

- a second run on a save directory in use is refused with the owner named, and the first run is unharmed;
- SIGTERM to the launcher (SLURM preemption, spot reclaim) makes every rank stop at a step boundary with a
  checkpoint of the step reached, and resuming from it ends bit-identical to a run that was never interrupted;
- SIGKILL of the launcher leaves no rank alive seconds later and no checkpoint written after it;
- a full disk (a real 2 MiB-per-checkpoint-short tmpfs) stops every rank with one message naming the directory,
  and the checkpoints saved before are intact;
- leftovers of killed writers are removed at start, only those matching our own temporary-file pattern.

Model: resnet18 at 128x160 from scratch, batch 2 per process, on the conftest's synthetic shards.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rock_dist.engine import checkpoint as ckpt
from rock_dist.engine.run_lock import LOCK_NAME

from numerics import HANG_GUARD_S
from small_network import SMALL_NETWORK

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SMALL = [*SMALL_NETWORK, "--image_size", "128", "160", "--batch_size", "2",
         "--num_workers", "0", "--writer_path", "", "--coco_json_save_path", "", "--val_path", "", "--seed", "3"]


def _env(**extra: str) -> dict[str, str]:
    from test_train_distributed import _env as base_env, _free_port

    return base_env(MAIN_PORT=str(_free_port()), **extra)


class _Run:
    """A launcher process whose output is collected by a thread, so the test can wait for a line."""

    def __init__(self, args: list[str], **env: str) -> None:
        self.proc = subprocess.Popen([str(LAUNCH / "cpu_2proc.sh"), *args], env=_env(**env),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = HANG_GUARD_S) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in ln for ln in self.lines):
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"run ended before printing {text!r}:\n{self.output[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output[-4000:]}")
            time.sleep(0.2)

    def finish(self, timeout: float = HANG_GUARD_S) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code


def _ranks_of(launcher_pid: int) -> list[int]:
    """Pids of the training processes under a launcher (its children running rock_dist.train)."""
    out = subprocess.run(["pgrep", "-f", "-P", str(launcher_pid), "rock_dist.train"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its new parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # in-process training runs here too


@pytest.mark.slow  # real multi-process launches: CI runs them, `-m "not slow"` skips them
def test_second_run_refused_then_sigterm_checkpoint_resumes_exactly(shard_dir: Path, tmp_path: Path) -> None:
    train = ["--train_path", str(shard_dir / "train"), *SMALL, "--train_eval_freq", "1"]
    save = tmp_path / "run"
    # With loader worker processes and validation workers: they must neither die before the checkpoint nor keep
    # the ranks from exiting afterwards.
    first = _Run([*train, "--num_iters", "400", "--model_save_freq", "0", "--save_path", str(save),
                  "--num_workers", "1"])
    first.wait_for("step 2/400")
    owner = json.loads((save / LOCK_NAME).read_text())
    # A second run on the same directory: refused at once, naming the owner; the first run goes on.
    second = subprocess.run([str(LAUNCH / "cpu_2proc.sh"), *train, "--num_iters", "4", "--save_path", str(save)],
                            env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    refusal = f"--save_path {save}: in use by another run (pid {owner['pid']} on host {owner['host']}"
    assert second.returncode != 0
    assert (second.stdout + second.stderr).count(refusal) == 2, (second.stdout + second.stderr)[-3000:]
    assert first.proc.poll() is None

    # Preemption: SIGTERM to the launcher, which forwards it to the ranks.
    first.proc.send_signal(signal.SIGTERM)
    first.finish()
    stopped = [ln for ln in first.lines if ln.startswith("stopped: stop signal received: checkpoint of iteration")]
    assert stopped, first.output[-4000:]
    saved = ckpt.periodic_checkpoints(save)
    assert len(saved) == 1, first.output[-3000:]
    step, path = saved[0]
    assert f"checkpoint of iteration {step} written to {path}" in stopped[0] and 2 <= step < 400
    assert not (save / LOCK_NAME).exists()  # released on the way out
    assert ckpt.read_checkpoint(path)["samples_seen"] == step * 4

    # Resume to step + 2, and compare with a run that was never interrupted.
    resumed = subprocess.run([str(LAUNCH / "cpu_2proc.sh"), *train, "--num_iters", str(step + 2),
                              "--model_save_freq", "0", "--save_path", str(save), "--checkpoint_path", str(save)],
                             env=_env(ROCK_DIST_RECORD_DIR=str(tmp_path / "rec_resumed")), capture_output=True,
                             text=True, timeout=HANG_GUARD_S)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    straight = subprocess.run([str(LAUNCH / "cpu_2proc.sh"), *train, "--num_iters", str(step + 2),
                               "--model_save_freq", "0", "--save_path", str(tmp_path / "straight")],
                              env=_env(ROCK_DIST_RECORD_DIR=str(tmp_path / "rec_straight")), capture_output=True,
                              text=True, timeout=HANG_GUARD_S)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    for r in range(2):
        a = json.loads((tmp_path / "rec_resumed" / f"rank{r}.json").read_text())
        b = json.loads((tmp_path / "rec_straight" / f"rank{r}.json").read_text())
        assert a["losses"] == b["losses"][step:] and a["digest"] == b["digest"]


@pytest.mark.slow  # real multi-process launches: CI runs them, `-m "not slow"` skips them
def test_sigkill_of_the_launcher_leaves_no_rank_and_no_later_checkpoint(shard_dir: Path, tmp_path: Path) -> None:
    save = tmp_path / "run"
    run = _Run(["--train_path", str(shard_dir / "train"), *SMALL, "--train_eval_freq", "1", "--num_iters", "400",
                "--model_save_freq", "1", "--keep_checkpoints", "1000", "--save_path", str(save)])
    run.wait_for("step 2/400")
    ranks = _ranks_of(run.proc.pid)
    assert len(ranks) == 2, ranks
    run.proc.kill()
    killed_at = time.time()
    run.finish()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in ranks), "a rank outlived its launcher by 10 s"
    time.sleep(1)
    # The watchdog polls every 0.5 s: a save already under way may complete, nothing starts after that.
    late = [p.name for _, p in ckpt.periodic_checkpoints(save) if p.stat().st_mtime > killed_at + 2]
    assert late == []


@pytest.mark.slow  # real multi-process launches: CI runs them, `-m "not slow"` skips them
def test_full_disk_stops_every_rank_and_keeps_the_earlier_checkpoint(shard_dir: Path, tmp_path: Path) -> None:
    # The size of one checkpoint of this model, from a 1-iteration run on the ordinary disk.
    probe = subprocess.run([str(LAUNCH / "cpu_2proc.sh"), "--train_path", str(shard_dir / "train"), *SMALL,
                            "--num_iters", "1", "--model_save_freq", "1", "--save_path", str(tmp_path / "probe")],
                           env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-3000:]
    size = ckpt.periodic_checkpoints(tmp_path / "probe")[0][1].stat().st_size
    disk = tmp_path / "small_disk"
    disk.mkdir()
    # Room for one checkpoint and a half: the first save fits, the second cannot.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test needs a tmpfs mount (root): {mounted.stderr}"
    try:
        save = disk / "run"
        proc = subprocess.run([str(LAUNCH / "cpu_2proc.sh"), "--train_path", str(shard_dir / "train"), *SMALL,
                               "--num_iters", "3", "--model_save_freq", "1", "--save_path", str(save)],
                              env=_env(), capture_output=True, text=True, timeout=HANG_GUARD_S)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0
        message = f"error: {save}: not enough disk space to save checkpoint_step0000002.pt"
        assert output.count(message) == 2, output[-4000:]  # the same line from both ranks
        # No rank died inside rock_dist with a trace (the launcher's own child-failure summary is its business).
        assert f'File "{REPO / "rock_dist"}' not in output
        saved = ckpt.periodic_checkpoints(save)
        assert [s for s, _ in saved] == [1]
        assert ckpt.read_checkpoint(saved[0][1])["step"] == 1  # intact and loadable
        assert not [p for p in save.iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_stale_temporary_files_are_removed_at_start(shard_dir: Path, tmp_path: Path, capsys: Any) -> None:
    from rock_dist.config import TrainConfig, parse_config
    from rock_dist.engine.trainer import train

    save = tmp_path / "run"
    save.mkdir()
    leftovers = [".checkpoint_step0000007.pt.k2j4x9.tmp", ".weights_final.pt.abc.tmp"]
    for name in leftovers:
        (save / name).write_bytes(b"\0" * 1000)
    (save / "notes.tmp").write_text("the user's own file")  # not ours: kept
    cfg = parse_config(TrainConfig, ["--train_path", str(shard_dir / "train"), *SMALL, "--num_iters", "1",
                                     "--model_save_freq", "0", "--save_path", str(save), "--no_verbose"])
    train(cfg)
    assert not any((save / n).exists() for n in leftovers) and (save / "notes.tmp").exists()
    assert "removed 2 temporary file(s) of interrupted saves" in capsys.readouterr().out
    assert not (save / LOCK_NAME).exists()


def test_lock_of_a_dead_run_is_taken_over_and_a_live_one_refused(tmp_path: Path) -> None:
    import socket

    from rock_dist.engine import run_lock
    from rock_dist.errors import ConfigError

    lock_file = tmp_path / LOCK_NAME
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": 999_999_999, "started": 0,  # no such pid
                                     "token": "x", "command": "python -m rock_dist.train"}))
    lock = run_lock.acquire(tmp_path)
    assert "took over the lock" in lock.note and "pid 999999999" in lock.note
    with pytest.raises(ConfigError, match=f"in use by another run \\(pid {os.getpid()}"):
        run_lock.acquire(tmp_path)
    lock.release()
    assert not lock_file.exists()
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0, "token": "y"}))
    with pytest.raises(ConfigError, match=f"another host.*delete {lock_file}"):
        run_lock.acquire(tmp_path)


# ------------------------------------------------------------------------------------------------- bad input
def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", f"rock_dist.{module}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)


def _weights(path: Path, **stored: Any) -> Path:
    """A real weights file of the small model; `stored` overrides fields of the model config written with it."""
    import dataclasses

    from rock_dist.config import ModelConfig
    from rock_dist.data.constants import CLASS_NAMES, SCENE_TYPES
    from rock_dist.model.builder import build_model

    config = ModelConfig(backbone="resnet18", pretrained="none", image_size=(128, 160))
    model = build_model(config)
    return ckpt.save_weights(path, model, dataclasses.replace(config, **stored), list(CLASS_NAMES),
                             list(SCENE_TYPES))


def test_a_garbage_checkpoint_is_named_without_unsafe_advice(shard_dir: Path, tmp_path: Path) -> None:
    import datetime

    import torch

    foreign = tmp_path / "foreign.pt"
    torch.save({"when": datetime.datetime(2020, 1, 1)}, foreign)  # a pickle with a non-tensor object
    # Random bytes, seeded: seed 0 fails in the unpickler at once; seed 502 first makes torch warn about a "pickle
    # protocol 191" (one machine's os.urandom found it: the warning must not become a second message).
    garbage = []
    for seed in (0, 502):
        garbage.append(tmp_path / f"random{seed}.pt")
        garbage[-1].write_bytes(random.Random(seed).randbytes(4000))
    for bad in (foreign, *garbage):
        proc = _cli("evaluate", str(bad), "--test_path", str(shard_dir / "test"))
        assert proc.returncode == 2
        assert proc.stderr.startswith(f"error: {bad}: not a ") and "checkpoint" in proc.stderr
        assert "weights_only" not in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_weights_that_do_not_fit_their_config_say_what_differs(shard_dir: Path, tmp_path: Path) -> None:
    path = _weights(tmp_path / "w.pt", backbone="resnet34")  # resnet18 weights filed as resnet34
    proc = _cli("evaluate", str(path), "--test_path", str(shard_dir / "test"))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {path}: weights do not fit the stored model configuration (backbone "
                                  "resnet34")
    assert "missing (e.g. backbone." in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_detect_on_a_folder_without_a_readable_image_fails(tmp_path: Path) -> None:
    weights = _weights(tmp_path / "w.pt")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"not a jpeg")
    (images / "b.png").write_bytes(b"\x89PNG but not really")
    out = tmp_path / "out"
    proc = _cli("detect", str(weights), "--image_path", str(images), "--detection_output_path", str(out))
    assert proc.returncode == 2
    assert f"error: --image_path {images}: none of its 2 file(s) could be read as an image" in proc.stderr
    assert "skipping" in proc.stderr and "skipping" not in proc.stdout  # reports go to stderr
    assert not (out / "detections.json").exists()
