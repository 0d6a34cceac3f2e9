#!/usr/bin/env bash
# Train with 2 CPU processes (gloo) on one machine: for testing the distributed path without GPUs.
# Usage: [NUM_PROCESSES=2] [MAIN_PORT=29500] launch/cpu_2proc.sh [rock_dist.train flags...]
#   e.g. launch/cpu_2proc.sh --backbone resnet18 --pretrained none --image_size 128 160 --batch_size 2 \
#            --num_iters 20
# Why not `accelerate launch --cpu --num_processes 2`: that starts ONE process. `--multi_gpu` with
# ACCELERATE_USE_CPU=1 starts N processes that join one gloo group (docs/training.md); the trainer asserts the world
# size.
set -euo pipefail
cd "$(dirname "$0")/.."
export ACCELERATE_USE_CPU=1
# Each process would otherwise start one thread per core and the two would fight over the same cores.
threads=$(( $(nproc) / ${NUM_PROCESSES:-2} ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"
exec accelerate launch --config_file accelerate_config.yaml --multi_gpu \
    --num_machines 1 --num_processes "${NUM_PROCESSES:-2}" --main_process_port "${MAIN_PORT:-29500}" \
    -m rock_dist.train --cpu "$@"
