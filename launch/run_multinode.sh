#!/usr/bin/env bash
# Multi-node launch with a hostfile, without ssh: run this once per node with its NODE_RANK.
#   HOSTFILE=launch/hostfile.example NODE_RANK=0 MASTER_ADDR=node0 bash launch/run_multinode.sh [args]
# Each hostfile line is "<name> slots=<ranks on that node>".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
exec deepspeed --hostfile "${HOSTFILE:?set HOSTFILE}" --no_ssh --node_rank "${NODE_RANK:?set NODE_RANK}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29513}" \
  launch/pretrain.py --deepspeed_config "${DS_CONFIG:-configs/zero3_cpu_tiny.json}" \
  --model "${MODEL_CONFIG:-configs/model/llama_tiny.json}" "$@"
