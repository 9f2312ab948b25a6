#!/usr/bin/env bash
# Sharded evaluation: bash scripts/dist_test.sh CONFIG CHECKPOINT GPUS [o2f eval args]
# e.g. bash scripts/dist_test.sh r50_1x runs/r50_1x/last.pt 8 --metrics-out metrics.json
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3
PORT=${PORT:-29500}
exec torchrun --nproc_per_node="$GPUS" --master_port="$PORT" -m o2f eval --config "$CONFIG" \
    --checkpoint "$CHECKPOINT" "$@"
