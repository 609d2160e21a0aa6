#!/usr/bin/env bash
# Idempotent environment setup: Debian MPI, a .venv with pinned CPU torch and
# the project's dependencies. Sourced by the quick-start scripts and .ci/run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

if ! command -v mpirun >/dev/null 2>&1 || [ ! -e /usr/include/x86_64-linux-gnu/openmpi ] && [ ! -e /usr/lib/x86_64-linux-gnu/openmpi/include ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y -q openmpi-bin libopenmpi-dev >/dev/null 2>&1 || {
      $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q openmpi-bin libopenmpi-dev >/dev/null; }
  fi
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
STAMP="$VENV/.ntl_deps_$(cat "$ROOT/requirements-dev.txt" "$ROOT/setup.cfg" | sha1sum | cut -c1-12)"
if [ ! -e "$STAMP" ]; then
  export DS_BUILD_OPS=0  # DeepSpeed without C++ builds; ops are JIT-compiled only if asked
  "$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$ROOT/requirements-dev.txt"
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e "$ROOT"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# CPU-only machines: DeepSpeed's CPU accelerator, gloo over loopback. With a GPU nothing is
# forced: ntl_deepspeed.device picks cuda/nccl (an explicit DS_ACCELERATOR still wins).
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
