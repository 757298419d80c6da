#!/usr/bin/env bash
# Launch a minitron job with the `deepspeed` launcher.
#   single node:  NUM_GPUS=8 launch/deepspeed.sh train deepspeed=zero2 output_dir=runs/x
#   multi node:   HOSTFILE=launch/hostfile.example launch/deepspeed.sh train deepspeed=zero3 ...
#   CPU (gloo):   NUM_GPUS=2 launch/deepspeed.sh train model=tiny      (num_gpus = processes)
# The launcher appends --local_rank=N to each process; the entry points accept it.
set -euo pipefail
job=${1:?usage: launch/deepspeed.sh <train|prune|distill> [key=value ...]}; shift
script=$(python -c "import minitron.cli.$job as m; print(m.__file__)")
args=(--master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then args+=(--hostfile "$HOSTFILE"); else args+=(--num_gpus "${NUM_GPUS:-1}"); fi
exec deepspeed "${args[@]}" "$script" "$@"
