#!/usr/bin/env bash
# Set everything up and run the whole test suite against real PostgreSQL and Redis
# (embedded ones started by the tests, or external ones: see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
