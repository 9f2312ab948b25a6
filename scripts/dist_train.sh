#!/usr/bin/env bash
# Data-parallel training on one node: bash scripts/dist_train.sh CONFIG GPUS [o2f train args]
# e.g. bash scripts/dist_train.sh r50_1x 8 --work-dir runs/r50_1x
# Several nodes: run torchrun yourself with --nnodes, --node_rank and --rdzv_endpoint.
set -euo pipefail
CONFIG=$1
GPUS=$2
shift 2
PORT=${PORT:-29500}
exec torchrun --nproc_per_node="$GPUS" --master_port="$PORT" -m o2f train --config "$CONFIG" "$@"
