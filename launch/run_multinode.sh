#!/usr/bin/env bash
# Multi-node launch with a hostfile, without ssh: run this once per node with its NODE_RANK.
#   HOSTFILE=launch/hostfile.example NODE_RANK=0 MASTER_ADDR=node0 bash launch/run_multinode.sh [args]
# Each hostfile line is "<name> slots=<ranks on that node>": the hostfile sets the ranks per node.
# Variables:
#   HOSTFILE       (required) the hostfile
#   NODE_RANK      (required) this node's index in the hostfile (0 .. nodes - 1)
#   MASTER_ADDR    address of node 0, reachable from every node (default: 127.0.0.1)
#   MASTER_PORT    rendezvous port (default: 29513)
#   DS_CONFIG      ds_config JSON with its "ntl" section (default: configs/zero3_cpu_tiny.json)
#   MODEL_CONFIG   model config JSON, a transformers config with model_type, llama if absent (default: configs/model/llama_tiny.json)
#   NTL_TORCH_SPEC, NTL_PYTHON: see launch/setup_env.sh (used when it installs)
# Arguments go to the trainer (ntl_deepspeed.train.cli; --help lists them). Relative paths are
# relative to the current directory. The command is checked first (ntl_deepspeed.train.preflight):
# a bad config prints one line "error: ..." and exits 2 before any rank starts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOSTFILE="${HOSTFILE:?set HOSTFILE}" NODE_RANK="${NODE_RANK:?set NODE_RANK}"
source "$ROOT/launch/setup_env.sh"
ARGS=(--deepspeed_config "${DS_CONFIG:-$ROOT/configs/zero3_cpu_tiny.json}"
      --model "${MODEL_CONFIG:-$ROOT/configs/model/llama_tiny.json}" "$@")
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" python -m ntl_deepspeed.train.preflight "${ARGS[@]}"
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29513}" \
  "$ROOT/launch/pretrain.py" "${ARGS[@]}"
