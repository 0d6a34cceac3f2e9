"""`python -m rock_dist.train` / `accelerate launch -m rock_dist.train`: train ROCK (or the SSD baseline) on shards.

The same flags work under both launchers (`--help` lists them all; they are the fields of `config.TrainConfig`).
Under `python` it is one process (one GPU or the CPU); under `accelerate launch` (see launch/ for one GPU, one node
with several GPUs, several nodes, SLURM, and 2 CPU processes) every process runs this same module and the engine
(`rock_dist.engine.trainer`) splits the data by rank and keeps the processes in step.
"""

from __future__ import annotations

from typing import Sequence

from rock_dist.cli import run_cli
from rock_dist.config import TrainConfig, parse_config


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(TrainConfig, argv, description="Train ROCK on NYU Depth v2 shards (single process, or "
                       "several under `accelerate launch -m rock_dist.train`).")
    from rock_dist.engine.trainer import train  # heavy imports after --help / flag errors

    train(cfg)
    return 0


if __name__ == "__main__":
    run_cli(main)
