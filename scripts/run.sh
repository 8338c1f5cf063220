#!/usr/bin/env bash
# Set everything up and serve the API on an embedded PostgreSQL + Redis (data kept in .data/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/embedded.py run "$@"
