#!/usr/bin/env bash
# The test command: sets up .venv (setup.sh), checks lint and formatting with ruff, then runs pytest.
# Extra arguments go to pytest (e.g. -k sampler).
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
