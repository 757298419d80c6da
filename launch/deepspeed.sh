#!/usr/bin/env bash
# Launch a minitron job with the `deepspeed` launcher.
#   single node:  NUM_GPUS=8 launch/deepspeed.sh train deepspeed=zero2 output_dir=runs/x
#   multi node:   HOSTFILE=launch/hostfile.example launch/deepspeed.sh train deepspeed=zero3 ...
#                 (from the first node; DeepSpeed starts the others over passwordless ssh)
#   without ssh:  on every node, HOSTFILE=... NODE_RANK=<its line in the hostfile, from 0>
#                 MASTER_ADDR=<the first node> launch/deepspeed.sh train ...
#   CPU (gloo):   NUM_GPUS=2 launch/deepspeed.sh train model=tiny      (num_gpus = processes)
# The launcher appends --local_rank=N to each process; the entry points accept it.
set -euo pipefail
job=${1:?usage: launch/deepspeed.sh <train|prune|distill|search|eval|pipeline> [key=value ...]}; shift
script=$(python -c "import minitron.cli.$job as m; print(m.__file__)")
args=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${MASTER_ADDR:-}" ]]; then args+=(--master_addr "$MASTER_ADDR"); fi
if [[ -n "${HOSTFILE:-}" ]]; then args+=(--hostfile "$HOSTFILE"); else args+=(--num_gpus "${NUM_GPUS:-1}"); fi
if [[ -n "${NODE_RANK:-}" ]]; then args+=(--no_ssh --node_rank "$NODE_RANK"); fi
exec deepspeed "${args[@]}" "$script" "$@"
