#!/usr/bin/env bash
# Two-rank demo of the vocab-parallel CE+NTL op on CPU (gloo).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
exec torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29511}" \
  launch/op_demo.py "$@"
