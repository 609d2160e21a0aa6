#!/usr/bin/env bash
# Quick start, command 1: ZeRO-3 pretraining with NTL on one node (deepspeed launcher; 2 CPU
# ranks by default).
#   DS_CONFIG=my_ds.json NPROC=4 bash launch/run_pretrain.sh --steps 50 --output-dir runs/x
# Variables (all optional):
#   DS_CONFIG      ds_config JSON with its "ntl" section (default: configs/zero3_cpu_tiny.json)
#   MODEL_CONFIG   model config JSON, a transformers config with model_type, llama if absent (default: configs/model/llama_tiny.json)
#   NPROC          ranks on this node, deepspeed --num_gpus (default: 2)
#   MASTER_ADDR    rendezvous address (default: 127.0.0.1)
#   MASTER_PORT    rendezvous port (default: 29512)
#   NTL_TORCH_SPEC, NTL_PYTHON: see launch/setup_env.sh (used when it installs)
# The quick start holds out 10 % of the embedded corpus' arithmetic *problems* (never trained on)
# and evaluates on them every 50 steps and at the end (number MAE, number-token accuracy, CE),
# then greedy-decodes 100 of them (generation.json): that is what NTL is for. Later arguments
# override these (e.g. --eval-fraction 0 to skip).
# Arguments go to the trainer (ntl_deepspeed.train.cli; --help lists them). Relative paths are
# relative to the current directory. The command is checked first (ntl_deepspeed.train.preflight):
# a bad config prints one line "error: ..." and exits 2 before any rank starts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
ARGS=(--deepspeed_config "${DS_CONFIG:-$ROOT/configs/zero3_cpu_tiny.json}"
      --model "${MODEL_CONFIG:-$ROOT/configs/model/llama_tiny.json}"
      --eval-fraction 0.1 --eval-every 50 --generate-eval 100 "$@")
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" python -m ntl_deepspeed.train.preflight "${ARGS[@]}"
exec deepspeed --num_gpus "${NPROC:-2}" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
  --master_port "${MASTER_PORT:-29512}" "$ROOT/launch/pretrain.py" "${ARGS[@]}"
