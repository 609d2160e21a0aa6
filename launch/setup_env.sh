#!/usr/bin/env bash
# Idempotent environment setup, sourced by launch/run_*.sh (and so by .ci/run):
#   1. Debian's Open MPI (openmpi-bin, libopenmpi-dev) if missing: apt-get, waiting for the
#      apt/dpkg locks instead of failing; a failure only warns (needed for run_mpi.sh only);
#   1b. Debian's libaio-dev if missing: the headers/library DeepSpeed's async I/O op (NVMe
#      offload, JIT-built with ninja) links against; a failure only warns (scale benchmark only);
#   2. .venv (python3 -m venv) if missing;
#   3. torch ($NTL_TORCH_SPEC), the pinned requirements-dev.txt and this project (editable),
#      once per content of requirements-dev.txt + setup.cfg + NTL_TORCH_SPEC +
#      NTL_MEGATRON_SECOND (a stamp file in .venv); concurrent callers wait for each other
#      (flock). megatron-core is installed apart (--no-deps --ignore-requires-python: 0.17+
#      declare Python >= 3.12 but ship cp311 wheels that work), and a second megatron-core
#      version into .venv/megatron-core-$NTL_MEGATRON_SECOND (pip --target) for
#      launch/run_tests.sh's second run of the Megatron tests.
# Every step that installs prints one line "[setup_env] ..." on stderr; nothing when all is there.
#
# Variables:
#   NTL_TORCH_SPEC  pip arguments for torch, word-split (default: torch==2.13.0, the CPU build
#                   CI tests); e.g. NTL_TORCH_SPEC="torch==2.13.0 --index-url <CUDA wheel index>".
#                   torch comes only from here: requirements-dev.txt's torch pin is skipped.
#   NTL_PYTHON      the interpreter that creates .venv (default: python3)
#   NTL_MEGATRON_SECOND  the second megatron-core version CI tests (default: 0.16.1; empty: none)
# Exported afterwards: PATH with .venv/bin first; without a working GPU (nvidia-smi -L)
# DS_ACCELERATOR=cpu and GLOO_SOCKET_IFNAME=lo (values already set win); OMP_NUM_THREADS=1 unless
# set; OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1; NTL_MEGATRON_SECOND_PATH (the second megatron-core's
# directory, for PYTHONPATH; empty when NTL_MEGATRON_SECOND is empty).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
NTL_TORCH_DEFAULT="torch==2.13.0"
NTL_MEGATRON_SECOND="${NTL_MEGATRON_SECOND-0.16.1}"

_ntl_say() { echo "[setup_env] $*" >&2; }

_ntl_has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

_ntl_need_mpi() {
  command -v mpirun >/dev/null 2>&1 || return 0
  if command -v dpkg-query >/dev/null 2>&1; then  # Debian: the headers mpi4py may build against
    dpkg-query -W -f='${Status}' libopenmpi-dev 2>/dev/null | grep -q "ok installed" || return 0
  fi
  return 1
}

_ntl_apt() {  # apt-get, waiting up to 5 min for the dpkg lock held by another apt/dpkg
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -y -q "$@"
}

_ntl_apt_update() {  # DPkg::Lock::Timeout does not cover the lists lock of "update": retry
  local i out=""
  for i in $(seq 30); do
    out="$(_ntl_apt update 2>&1)" && return 0
    case "$out" in
      *"Could not get lock"*|*"Unable to lock"*) sleep 10 ;;
      *) break ;;
    esac
  done
  echo "$out" >&2
  return 1
}

_ntl_install_mpi() {
  _ntl_say "installing Open MPI: apt-get install openmpi-bin libopenmpi-dev"
  local out
  _ntl_apt install openmpi-bin libopenmpi-dev >/dev/null 2>&1 && return 0
  if _ntl_apt_update && out="$(_ntl_apt install openmpi-bin libopenmpi-dev 2>&1)"; then
    return 0
  fi
  echo "${out:-}" | tail -5 >&2
  _ntl_say "WARNING: could not install Open MPI (needed by launch/run_mpi.sh and its test)"
}

_ntl_install_python() {  # runs under the setup lock, in a subshell
  local torch_spec="${NTL_TORCH_SPEC:-$NTL_TORCH_DEFAULT}" torch_args stamp reqs
  stamp="$VENV/.ntl_deps_$( { cat "$ROOT/requirements-dev.txt" "$ROOT/setup.cfg";
                               echo "$torch_spec $NTL_MEGATRON_SECOND"; } | sha1sum | cut -c1-12)"
  [ -e "$stamp" ] && return 0
  export DS_BUILD_OPS=0  # DeepSpeed without C++ builds; ops are JIT-compiled only if asked
  local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  if [ -z "${NTL_TORCH_SPEC:-}" ] && _ntl_has_gpu; then
    _ntl_say "a GPU is present but NTL_TORCH_SPEC is unset: installing the CPU pin" \
             "$NTL_TORCH_DEFAULT; for a CUDA build set e.g." \
             "NTL_TORCH_SPEC=\"torch==2.13.0 --index-url <CUDA wheel index>\""
  fi
  _ntl_say "installing torch into .venv: pip install $torch_spec"
  read -r -a torch_args <<< "$torch_spec"  # split on blanks (no globbing): options may follow
  "${pip[@]}" "${torch_args[@]}"
  _ntl_say "installing requirements-dev.txt into .venv (pinned versions, torch excepted)"
  reqs="$VENV/.requirements-dev-no-torch.txt"
  grep -v -E '^[[:space:]]*(torch|megatron-core)[[:space:]]*([=<>!~;[]|$)' \
    "$ROOT/requirements-dev.txt" > "$reqs"
  "${pip[@]}" -r "$reqs"
  local megatron
  megatron="$(grep -o -E '^[[:space:]]*megatron-core[[:space:]]*==[^[:space:]#;]+' \
              "$ROOT/requirements-dev.txt" | tr -d '[:space:]')"
  if [ -n "$megatron" ]; then  # its deps (torch, numpy, packaging) come from the lines above
    _ntl_say "installing $megatron into .venv (--no-deps --ignore-requires-python)"
    "${pip[@]}" --no-deps --ignore-requires-python "$megatron"
  fi
  if [ -n "$NTL_MEGATRON_SECOND" ]; then
    _ntl_say "installing megatron-core==$NTL_MEGATRON_SECOND into" \
             ".venv/megatron-core-$NTL_MEGATRON_SECOND (second version for the Megatron tests)"
    rm -rf "$VENV/megatron-core-$NTL_MEGATRON_SECOND"
    "${pip[@]}" --no-deps --ignore-requires-python --target \
      "$VENV/megatron-core-$NTL_MEGATRON_SECOND" "megatron-core==$NTL_MEGATRON_SECOND"
  fi
  _ntl_say "installing ntl-deepspeed into .venv (editable, no dependencies)"
  "${pip[@]}" --no-deps -e "$ROOT"
  rm -f "$VENV"/.ntl_deps_*
  touch "$stamp"
}

if _ntl_need_mpi && command -v apt-get >/dev/null 2>&1; then
  _ntl_install_mpi
fi

# --- libaio (DeepSpeed NVMe offload: the async_io op; benchmarks/scale.py) ---
_ntl_need_aio() {
  command -v dpkg-query >/dev/null 2>&1 || return 1  # non-Debian: the user installs libaio
  ! dpkg-query -W -f='${Status}' libaio-dev 2>/dev/null | grep -q "ok installed"
}
if _ntl_need_aio && command -v apt-get >/dev/null 2>&1; then
  _ntl_say "installing libaio-dev (DeepSpeed async I/O op): apt-get install libaio-dev"
  _ntl_apt install libaio-dev >/dev/null 2>&1 \
    || { _ntl_apt_update && _ntl_apt install libaio-dev >/dev/null 2>&1; } \
    || _ntl_say "WARNING: could not install libaio-dev (needed for NVMe offload only)"
fi
# --- end libaio ---

mkdir -p "$VENV"
(
  if command -v flock >/dev/null 2>&1; then flock 9; fi
  if [ ! -x "$VENV/bin/python" ]; then
    _ntl_say "creating $VENV (${NTL_PYTHON:-python3} -m venv)"
    "${NTL_PYTHON:-python3}" -m venv "$VENV"
  fi
  _ntl_install_python
) 9>"$VENV/.setup.lock"

export PATH="$VENV/bin:$PATH"
# CPU-only machines: DeepSpeed's CPU accelerator, gloo over loopback. With a GPU nothing is
# forced: ntl_deepspeed.train.device picks cuda/nccl (an explicit DS_ACCELERATOR still wins).
if ! _ntl_has_gpu; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export NTL_MEGATRON_SECOND_PATH="${NTL_MEGATRON_SECOND:+$VENV/megatron-core-$NTL_MEGATRON_SECOND}"
