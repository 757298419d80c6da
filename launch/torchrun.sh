#!/usr/bin/env bash
# Launch a minitron job with torchrun.
#   single node:  NPROC=8 launch/torchrun.sh train deepspeed=zero2 output_dir=runs/x
#   multi node:   on every node, NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0> NPROC=8 launch/torchrun.sh train ...
#   CPU (gloo):   NPROC=2 launch/torchrun.sh train model=tiny
set -euo pipefail
job=${1:?usage: launch/torchrun.sh <train|prune|distill|search|eval|pipeline> [key=value ...]}; shift
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC:-1}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m "minitron.cli.$job" "$@"
