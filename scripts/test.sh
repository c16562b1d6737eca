#!/usr/bin/env bash
# The README's test command: set up the test host (idempotent), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_test_env.sh
exec "${SDN_VENV:-.venv}/bin/python" -m pytest tests "$@"
