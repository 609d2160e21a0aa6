#!/usr/bin/env bash
# Quick start, command 2: set up the environment and run the test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
exec python -m pytest -q tests "$@"
