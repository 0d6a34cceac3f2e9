"""Multi-process training through the REAL launcher (`accelerate launch` via launch/*.sh), 2 CPU processes on gloo.

Covers: the world size is asserted (2 or 4 processes really joined one group), ranks train on disjoint samples,
parameters end identical on every rank (with gradient accumulation under DDP), the LR schedule counts global
iterations, a non-finite loss on one rank stops both at the same step with no checkpoint after it, early stopping
stops both at the same step (EMA weights identical on both, TensorBoard written by rank 0 only), a rank without
data error met by one rank only stops all of them before training instead of hanging, any world size trains on a
one-shard split with every image once per epoch, a mid-epoch resume is bit-identical with the same layout and
continues the data exactly in 1 process, a checkpoint written by 2 processes resumes in 1, a two-machine
launch (two launcher invocations, machine ranks 0 and 1, one process each) works on loopback, and the baseline SSD
and a subset of auxiliary tasks train under DDP (no parameter without a gradient).

Each rank reports through the test hook ROCK_DIST_RECORD_DIR (see rock_dist.engine.trainer). Model: resnet18,
input 128x160, --pretrained none, batch 2 per process; shards with one sample each, or the whole split in one shard.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from rock_dist.engine import checkpoint as ckpt

from numerics import HANG_GUARD_S
from small_network import SMALL_NETWORK

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TIMEOUT_S = HANG_GUARD_S
SMALL = [*SMALL_NETWORK, "--image_size", "128", "160", "--batch_size", "2",
         "--num_workers", "0", "--writer_path", "", "--coco_json_save_path", ""]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ROCK_DIST_", "ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_"))}
    # Two processes share the machine's cores; one thread each avoids oversubscription.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _records(record_dir: Path, n: int = 2) -> list[dict[str, Any]]:
    return [json.loads((record_dir / f"rank{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module")
def one_per_shard(nyu_files: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conftest's synthetic dataset with ONE sample per shard (9 train shards: 5 for rank 0, 4 for rank 1)."""
    from rock_dist.shards import main

    out = tmp_path_factory.mktemp("shards_1") / "nyuv2"
    assert main(nyu_files.build_argv(out, "--samples_per_shard", "1")) == 0
    return out


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # in-process training runs here too


def _assert_disjoint_first_epoch(records: list[dict[str, Any]], steps: int, per_step: int) -> None:
    seen = [{i for batch in rec["image_ids"][:steps] for i in batch} for rec in records]
    assert all(len(s) == steps * per_step for s in seen), seen  # no sample twice within a rank's first epoch
    assert not seen[0] & seen[1], seen  # and none shared between the ranks


@pytest.mark.slow  # real multi-process launch: CI runs it, `-m "not slow"` skips it
def test_two_processes_through_launcher(one_per_shard: Path, tmp_path: Path) -> None:
    record = tmp_path / "record"
    save = tmp_path / "ckpt"
    cmd = [str(LAUNCH / "cpu_2proc.sh"), "--train_path", str(one_per_shard / "train"),
           "--val_path", str(one_per_shard / "val"), *SMALL, "--num_iters", "2", "--lr", "1e-4",
           "--gradient_accumulation_steps", "2", "--scheduler_milestones", "1", "--scheduler_gamma", "0.5",
           "--model_save_freq", "1", "--save_path", str(save)]
    proc = subprocess.run(cmd, env=_env(ROCK_DIST_RECORD_DIR=str(record), MAIN_PORT=str(_free_port())),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = _records(record)
    assert [r["rank"] for r in recs] == [0, 1]
    assert all(r["world_size"] == 2 and r["distributed_type"] == "MULTI_CPU" for r in recs)
    # DDP with accumulation (no all-reduce on the first micro-batch): still bit-identical parameters and buffers.
    assert recs[0]["digest"] == recs[1]["digest"]
    assert recs[0]["losses"] == recs[1]["losses"] and len(recs[0]["losses"]) == 2  # global loss, all-reduced
    # One scheduler step per global iteration (a prepared scheduler would have stepped once per micro-batch and
    # process), so the milestone at iteration 1 affects exactly iteration 2.
    assert recs[0]["lrs"] == pytest.approx([1e-4, 5e-5], rel=1e-12)
    # 9 samples // (2 ranks x batch 2) = 2 micro-batches per epoch = the first iteration (2 x 2 images per rank).
    _assert_disjoint_first_epoch(recs, steps=1, per_step=4)
    assert "val AP" in proc.stdout

    # A checkpoint written by 2 processes: load it for evaluation, and resume training in 1 process.
    saved = dict(ckpt.periodic_checkpoints(save))
    assert sorted(saved) == [1, 2] and (save / ckpt.FINAL_WEIGHTS_NAME).is_file()
    data = ckpt.read_checkpoint(saved[1])
    assert data["world_size"] == 2 and data["step"] == 1 and len(data["rng"]) == 2
    model, model_cfg, meta = ckpt.load_model(saved[1], "cpu")
    assert model_cfg.backbone == "resnet18" and meta["step"] == 1

    from rock_dist.config import TrainConfig, parse_config
    from rock_dist.engine.trainer import train

    cfg = parse_config(TrainConfig, ["--train_path", str(one_per_shard / "train"), "--val_path", "", *SMALL,
                                     "--num_iters", "2", "--lr", "1e-4", "--scheduler_milestones", "1",
                                     "--scheduler_gamma", "0.5", "--checkpoint_path", str(saved[1]),
                                     "--save_path", str(tmp_path / "single"), "--model_save_freq", "0",
                                     "--no_verbose"])
    result = train(cfg)
    assert result.step == 2 and len(result.losses) == 1  # only the remaining iteration
    assert result.lrs == pytest.approx([5e-5], rel=1e-12)  # the scheduler state came along


@pytest.mark.slow  # real multi-process launch: CI runs it, `-m "not slow"` skips it
def test_nonfinite_loss_stops_both_ranks(one_per_shard: Path, tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    # --no_rock: also the baseline SSD under DDP (a parameter without gradient would fail iteration 2's forward).
    cmd = [str(LAUNCH / "cpu_2proc.sh"), "--train_path", str(one_per_shard / "train"), "--val_path", "", *SMALL,
           "--num_iters", "4", "--model_save_freq", "1", "--save_path", str(save), "--no_rock"]
    # Test hook: the loss of global iteration 2 on rank 1 (only) becomes NaN.
    proc = subprocess.run(cmd, env=_env(ROCK_DIST_FAULT_NONFINITE="2:1", MAIN_PORT=str(_free_port())),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    message = "error: non-finite training loss at iteration 2 on rank(s) 1"
    assert output.count(message) == 2, output[-4000:]  # printed by BOTH ranks: both stopped at iteration 2
    assert "exitcode: 3" in output  # NonFiniteLossError's exit status, not a crash or a timeout
    assert [s for s, _ in ckpt.periodic_checkpoints(save)] == [1]  # nothing written at or after iteration 2
    assert not (save / ckpt.FINAL_WEIGHTS_NAME).exists()
    assert not [p for p in save.iterdir() if p.name.startswith(".")]  # no half-written temporary file


@pytest.mark.slow  # real multi-process launch: CI runs it, `-m "not slow"` skips it
def test_early_stopping_ema_and_trackers_agree_across_ranks(one_per_shard: Path, tmp_path: Path) -> None:
    """2 ranks with --early_stopping_patience 1, --ema_decay and TensorBoard. A network that does not change (lr
    1e-12, every BatchNorm on its running statistics by the test hook) has the same val AP at every validation, so
    both ranks stop together at iteration 2, with a checkpoint and the final weights there; their EMA weights are
    identical; only the main process wrote TensorBoard files."""
    record, save, tb = tmp_path / "record", tmp_path / "ckpt", tmp_path / "tb"
    cmd = [str(LAUNCH / "cpu_2proc.sh"), "--train_path", str(one_per_shard / "train"),
           "--val_path", str(one_per_shard / "val"), *SMALL, "--num_iters", "6", "--lr", "1e-12",
           "--val_eval_freq", "1", "--early_stopping_patience", "1", "--ema_decay", "0.5", "--model_save_freq", "0",
           "--report_to", "tensorboard", "--writer_path", str(tb), "--save_path", str(save)]
    proc = subprocess.run(cmd, env=_env(ROCK_DIST_RECORD_DIR=str(record), ROCK_DIST_TEST_BN_EVAL="1",
                                        MAIN_PORT=str(_free_port())), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = _records(record)
    assert all(r["world_size"] == 2 and r["step"] == 2 and r["early_stopped"] for r in recs), recs
    assert recs[0]["losses"] == recs[1]["losses"] and len(recs[0]["losses"]) == 2
    assert recs[0]["ema_digest"] and recs[0]["ema_digest"] == recs[1]["ema_digest"]
    assert recs[0]["ema_digest"] != recs[0]["digest"] and recs[0]["digest"] == recs[1]["digest"]
    assert proc.stdout.count("early stopping: val AP has not improved for 1 validation(s)") == 1  # main's console
    assert "stopping at iteration 2 of 6" in proc.stdout
    assert [s for s, _ in ckpt.periodic_checkpoints(save)] == [2]
    assert (save / ckpt.FINAL_WEIGHTS_NAME).is_file() and (save / ckpt.FINAL_EMA_WEIGHTS_NAME).is_file()
    assert len(list(tb.glob("events.out.tfevents.*"))) == 1  # one writer: rank 0's


@pytest.fixture(scope="module")
def one_shard(nyu_files: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conftest's synthetic dataset with the whole train split (9 images) in ONE shard."""
    from rock_dist.shards import main

    out = tmp_path_factory.mktemp("shards_one") / "nyuv2"
    assert main(nyu_files.build_argv(out, "--samples_per_shard", "100")) == 0
    assert len(list((out / "train").glob("*.tar"))) == 1
    return out


def _positions(records: list[dict[str, Any]], batch: int, accumulation: int = 1,
               first_step: int = 0) -> dict[int, int]:
    """Global stream position -> image id, from every rank's record: rank r's q-th sample is position q * R + r."""
    world = len(records)
    out: dict[int, int] = {}
    for r, rec in enumerate(records):
        for s, ids in enumerate(rec["image_ids"]):
            for k, image_id in enumerate(ids):
                q = (first_step + s) * accumulation * batch + k
                out[q * world + r] = image_id
    return out


def _launch(n: int, args: list[str], record: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCH / "cpu_2proc.sh"), *args],
                          env=_env(NUM_PROCESSES=str(n), ROCK_DIST_RECORD_DIR=str(record), MAIN_PORT=str(_free_port())),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.slow  # real multi-process launch: CI runs it, `-m "not slow"` skips it
@pytest.mark.parametrize("processes", [2, 4])
def test_launch_on_one_shard_sees_each_image_once_per_epoch(one_shard: Path, tmp_path: Path,
                                                            processes: int) -> None:
    from rock_dist.data.manifest import load_manifest

    ids = load_manifest(one_shard / "train").image_ids
    steps = -(-len(ids) // (2 * processes))  # iterations of 2 images per process that cover one epoch
    args = ["--train_path", str(one_shard / "train"), "--val_path", "", *SMALL, "--num_iters", str(steps),
            "--model_save_freq", "0", "--save_path", str(tmp_path / "ckpt")]
    proc = _launch(processes, args, tmp_path / "record")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = _records(tmp_path / "record", processes)
    assert all(r["world_size"] == processes for r in recs)
    assert {len(r["image_ids"]) for r in recs} == {steps}  # the same number of steps on every rank
    assert len({r["digest"] for r in recs}) == 1
    seen = _positions(recs, batch=2)
    assert sorted(seen[p] for p in range(len(ids))) == sorted(ids)  # the epoch: every image exactly once


@pytest.mark.slow  # real multi-process launch: CI runs it, `-m "not slow"` skips it
def test_resume_mid_epoch_exact_same_layout_and_complete_in_one_process(one_shard: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    train = ["--train_path", str(one_shard / "train"), "--val_path", "", *SMALL, "--lr", "1e-4"]
    full = _launch(2, [*train, "--num_iters", "4", "--model_save_freq", "1", "--keep_checkpoints", "4",
                       "--save_path", str(tmp_path / "a")],
                   tmp_path / "rec_full")
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    saved = dict(ckpt.periodic_checkpoints(tmp_path / "a"))
    assert ckpt.read_checkpoint(saved[1])["samples_seen"] == 4  # 1 iteration x 2 processes x 2 images
    # Same layout, resumed at iteration 1 (mid-epoch: 4 of 9 images seen): bit-identical to the uninterrupted run.
    part = _launch(2, [*train, "--num_iters", "4", "--model_save_freq", "0", "--save_path", str(tmp_path / "b"),
                       "--checkpoint_path", str(saved[1])], tmp_path / "rec_part")
    assert part.returncode == 0, part.stdout[-3000:] + part.stderr[-3000:]
    assert "exact continuation" in part.stdout
    recs_full, recs_part = _records(tmp_path / "rec_full"), _records(tmp_path / "rec_part")
    for a, b in zip(recs_full, recs_part):
        assert b["losses"] == a["losses"][1:] and b["image_ids"] == a["image_ids"][1:]
        assert b["digest"] == a["digest"]
    # 2 -> 1 process (batch 4, the same global batch): the data continues at global position 4, nothing repeated
    # or skipped within the epoch.
    from rock_dist.config import TrainConfig, parse_config
    from rock_dist.engine.trainer import train as run_training

    monkeypatch.setenv("ROCK_DIST_RECORD_DIR", str(tmp_path / "rec_one"))
    args = [a if a != "2" else "4" for a in train]  # --batch_size 2 -> 4
    cfg = parse_config(TrainConfig, [*args, "--num_iters", "4", "--checkpoint_path", str(saved[1]),
                                     "--save_path", str(tmp_path / "c"), "--model_save_freq", "0", "--no_verbose"])
    assert cfg.data.batch_size == 4
    assert run_training(cfg).step == 4
    one = json.loads((tmp_path / "rec_one" / "rank0.json").read_text())
    expected = _positions(recs_full, batch=2)
    resumed = {4 + k: i for k, i in enumerate(x for ids in one["image_ids"] for x in ids)}
    assert resumed == {p: expected[p] for p in range(4, 16)}


def _damage_sample(split: Path, key: str) -> None:
    """Zero the start of sample `key`'s JPEG in place (found through the split's index): headers stay valid."""
    index = json.loads((split / "index.json").read_text())
    shard, start = next((sh["name"], sp[0]) for sh in index["shards"] for k, sp in zip(sh["keys"], sh["spans"])
                        if k == key)
    with open(split / shard, "r+b") as tar:
        tar.seek(start)
        assert tar.read(100).rstrip(b"\0").decode() == f"{key}.rgb.jpg"
        tar.seek(start + 512)
        tar.write(b"\0" * 64)


# mid_run trains a few steps on 2 processes first: slow tier; first_batch keeps the check in the quick tier.
@pytest.mark.parametrize("batch", [pytest.param(0, id="first_batch"),
                                   pytest.param(1, id="mid_run", marks=pytest.mark.slow)])
def test_a_data_error_on_one_rank_stops_every_rank_with_its_message(one_shard: Path, tmp_path: Path,
                                                                    batch: int) -> None:
    """A damaged sample that only rank 1 reads (in its first batch, or in its second = iteration 2): both ranks stop
    with the same one-line cause instead of one dying in a collective; nothing is saved after it."""
    import shutil

    from rock_dist.data.loader_spec import TrainLoaderSpec
    from rock_dist.data.pipeline import make_train_loader

    split = tmp_path / "train"
    shutil.copytree(one_shard / "train", split)
    stream = make_train_loader(TrainLoaderSpec(str(split), image_size=(128, 160), target_size=(16, 20), batch_size=2,
                                               num_workers=0, seed=0, rank=1, world_size=2))
    victim = stream.planned_keys(1, first=2 * batch)[0]
    _damage_sample(split, victim)
    cmd = [str(LAUNCH / "cpu_2proc.sh"), "--train_path", str(split), "--val_path", "", *SMALL,
           "--num_iters", "3", "--model_save_freq", "1", "--save_path", str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, env=_env(MAIN_PORT=str(_free_port())), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    where = ("the training data failed on some process before training started" if batch == 0 else
             "training data failed at iteration 2")
    # The same message from both ranks (counted in the whole output: two processes share the launcher's stderr).
    message = re.search(f"error: {re.escape(where)}: rank 1: [^\n]*?on purpose\\)", output)
    assert message is not None, output[-4000:]
    assert output.count(message.group(0)) == 2, output[-4000:]
    assert victim in message.group(0) and "fails its checksum" in message.group(0)
    saved = [s for s, _ in ckpt.periodic_checkpoints(tmp_path / "ckpt")]
    assert saved == ([] if batch == 0 else [1])  # iteration 1 completed and was saved; nothing after


@pytest.mark.slow  # real multi-process launch: CI runs it, `-m "not slow"` skips it
def test_two_machines_on_loopback(one_per_shard: Path, tmp_path: Path) -> None:
    """Two launcher invocations (machine ranks 0 and 1, one CPU process each) rendezvous on 127.0.0.1."""
    record = tmp_path / "record"
    port = str(_free_port())
    # A subset of the auxiliary tasks (docs/training.md: no parameter may be left without a gradient under DDP).
    args = ["--train_path", str(one_per_shard / "train"), "--val_path", "", *SMALL, "--num_iters", "2",
            "--model_save_freq", "0", "--save_path", str(tmp_path / "ckpt"), "--aux_tasks", "scene", "normals"]
    procs = [subprocess.Popen([str(LAUNCH / "multi_node.sh"), *args],
                              env=_env(CPU="1", NUM_MACHINES="2", MACHINE_RANK=str(rank), MAIN_ADDR="127.0.0.1",
                                       MAIN_PORT=port, ROCK_DIST_RECORD_DIR=str(record)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    recs = _records(record)
    assert all(r["world_size"] == 2 for r in recs)
    assert [r["local_process_index"] for r in recs] == [0, 0]  # one process per "machine"
    assert recs[0]["digest"] == recs[1]["digest"]
    _assert_disjoint_first_epoch(recs, steps=2, per_step=2)
    # Only the global main process (machine 0) writes files.
    assert (tmp_path / "ckpt" / ckpt.FINAL_WEIGHTS_NAME).is_file()
    assert "done: 2 iterations" in outputs[0] and "done: 2 iterations" not in outputs[1]
