#!/usr/bin/env bash
# Train on SEVERAL machines (plain, no scheduler): run this script once on every machine.
# Required environment:
#   NUM_MACHINES    number of machines (e.g. 2)
#   MACHINE_RANK    0 on the machine that hosts the rendezvous, 1..NUM_MACHINES-1 on the others
#   MAIN_ADDR       address of machine 0 reachable from all machines (e.g. 10.0.0.1)
# Optional: MAIN_PORT (29500), GPUS_PER_MACHINE (all visible GPUs), CPU=1 to run CPU processes (gloo) instead.
# Example, 2 machines x 8 GPUs:
#   machine A: NUM_MACHINES=2 MACHINE_RANK=0 MAIN_ADDR=10.0.0.1 launch/multi_node.sh --batch_size 8
#   machine B: NUM_MACHINES=2 MACHINE_RANK=1 MAIN_ADDR=10.0.0.1 launch/multi_node.sh --batch_size 8
# Every machine needs the same code, the same flags and the shards at the same path (or shared storage).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NUM_MACHINES:?set NUM_MACHINES}" "${MACHINE_RANK:?set MACHINE_RANK}" "${MAIN_ADDR:?set MAIN_ADDR}"
extra=()
if [[ "${CPU:-0}" == "1" ]]; then
    # Without ACCELERATE_USE_CPU a --multi_gpu launch on CPU starts unrelated single processes (docs/training.md).
    export ACCELERATE_USE_CPU=1
    GPUS_PER_MACHINE="${GPUS_PER_MACHINE:-1}"
    extra+=(--cpu)
elif [[ -z "${GPUS_PER_MACHINE:-}" ]]; then
    GPUS_PER_MACHINE=$(python -c "import torch; print(torch.cuda.device_count())")
fi
# accelerate's --num_processes is the TOTAL over all machines.
exec accelerate launch --config_file accelerate_config.yaml --multi_gpu \
    --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" \
    --num_processes $(( NUM_MACHINES * GPUS_PER_MACHINE )) \
    --main_process_ip "$MAIN_ADDR" --main_process_port "${MAIN_PORT:-29500}" --same_network \
    -m rock_dist.train "${extra[@]}" "$@"
