#!/usr/bin/env bash
# MPI launch (Open MPI + mpi4py rank discovery):  NP=2 bash launch/run_mpi.sh [pretrain args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}" MASTER_PORT="${MASTER_PORT:-29514}"
exec mpirun -np "${NP:-2}" --oversubscribe --allow-run-as-root \
  --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo \
  -x DS_ACCELERATOR -x OMP_NUM_THREADS -x GLOO_SOCKET_IFNAME -x MASTER_ADDR -x MASTER_PORT -x PATH \
  python launch/pretrain.py --mpi --deepspeed_config "${DS_CONFIG:-configs/zero3_cpu_tiny.json}" \
  --model "${MODEL_CONFIG:-configs/model/llama_tiny.json}" "$@"
