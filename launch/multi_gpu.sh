#!/usr/bin/env bash
# Train on all (or NUM_GPUS) GPUs of ONE machine with DDP: one process per GPU.
# Usage: [NUM_GPUS=8] [MAIN_PORT=29500] launch/multi_gpu.sh [rock_dist.train flags...]
#   e.g. NUM_GPUS=4 launch/multi_gpu.sh --batch_size 8 --num_iters 30000
# --batch_size is per process: the global batch is batch_size x NUM_GPUS x gradient_accumulation_steps, and
# --num_iters counts optimizer steps at that global batch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${NUM_GPUS:-}" ]]; then
    NUM_GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
fi
if [[ "$NUM_GPUS" -lt 1 ]]; then
    echo "launch/multi_gpu.sh: no CUDA device visible (for CPU processes use launch/cpu_2proc.sh)" >&2
    exit 2
fi
exec accelerate launch --config_file accelerate_config.yaml --multi_gpu \
    --num_machines 1 --num_processes "$NUM_GPUS" --main_process_port "${MAIN_PORT:-29500}" \
    -m rock_dist.train "$@"
