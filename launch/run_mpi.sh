#!/usr/bin/env bash
# MPI launch (Open MPI's mpirun + mpi4py rank discovery, TCP over lo):
#   NPROC=2 bash launch/run_mpi.sh [args]
# Variables (all optional):
#   NPROC          ranks, mpirun -np (default: 2; NP is the older name, still read)
#   MASTER_ADDR    rendezvous address (default: 127.0.0.1)
#   MASTER_PORT    rendezvous port (default: 29514)
#   DS_CONFIG      ds_config JSON with its "ntl" section (default: configs/zero3_cpu_tiny.json)
#   MODEL_CONFIG   model config JSON, a transformers config with model_type, llama if absent (default: configs/model/llama_tiny.json)
#   NTL_TORCH_SPEC, NTL_PYTHON: see launch/setup_env.sh (used when it installs)
# Arguments go to the trainer (ntl_deepspeed.train.cli; --help lists them). Relative paths are
# relative to the current directory. The command is checked first (ntl_deepspeed.train.preflight):
# a bad config prints one line "error: ..." and exits 2 before any rank starts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
ARGS=(--mpi --deepspeed_config "${DS_CONFIG:-$ROOT/configs/zero3_cpu_tiny.json}"
      --model "${MODEL_CONFIG:-$ROOT/configs/model/llama_tiny.json}" "$@")
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" python -m ntl_deepspeed.train.preflight "${ARGS[@]}"
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}" MASTER_PORT="${MASTER_PORT:-29514}"
exec mpirun -np "${NPROC:-${NP:-2}}" --oversubscribe --allow-run-as-root \
  --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo \
  -x DS_ACCELERATOR -x OMP_NUM_THREADS -x GLOO_SOCKET_IFNAME -x MASTER_ADDR -x MASTER_PORT -x PATH \
  python "$ROOT/launch/pretrain.py" "${ARGS[@]}"
