#!/usr/bin/env bash
# Quick start, command 2: set up the environment and run the test suite.
# Without arguments, the Megatron test modules (tests/test_megatron_*.py) then run a second time
# against the second megatron-core version (setup_env.sh: NTL_MEGATRON_SECOND, 0.16.1, put
# first on PYTHONPATH); with arguments, only pytest with them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
if [ "$#" -gt 0 ] || [ -z "${NTL_MEGATRON_SECOND_PATH:-}" ]; then
  exec python -m pytest -q tests "$@"
fi
status=0
python -m pytest -q tests || status=$?
echo "== Megatron tests on megatron-core $NTL_MEGATRON_SECOND ($NTL_MEGATRON_SECOND_PATH)"
PYTHONPATH="$NTL_MEGATRON_SECOND_PATH${PYTHONPATH:+:$PYTHONPATH}" \
  python -m pytest -q tests/test_megatron_*.py || status=$?
exit "$status"
