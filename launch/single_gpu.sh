#!/usr/bin/env bash
# Train on ONE GPU (or the CPU when none is present) through the Accelerate launcher.
# Usage: launch/single_gpu.sh [rock_dist.train flags...]
#   e.g. launch/single_gpu.sh --train_path shards/nyuv2/train --val_path shards/nyuv2/test --batch_size 32
# Equivalent without the launcher: python -m rock_dist.train [flags...]
# Environment: GPU (default 0) picks the device.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_VISIBLE_DEVICES="${GPU:-${CUDA_VISIBLE_DEVICES:-0}}"
# No --config_file: its distributed_type MULTI_GPU would wrap the single process in DDP for nothing. Precision and
# compile are rock_dist flags (--mixed_precision, --compile), so the launcher is told 'no' for both.
exec accelerate launch --num_machines 1 --num_processes 1 --mixed_precision no --dynamo_backend no \
    -m rock_dist.train "$@"
