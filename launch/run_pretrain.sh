#!/usr/bin/env bash
# Quick start, command 1: ZeRO-3 pretraining with NTL on 2 CPU ranks (deepspeed launcher).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
exec deepspeed --num_gpus 2 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29512}" \
  launch/pretrain.py --deepspeed_config configs/zero3_cpu_tiny.json \
  --model configs/model/llama_tiny.json "$@"
