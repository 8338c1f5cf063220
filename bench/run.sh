#!/usr/bin/env bash
# The IM-Backend benchmark: bash bench/run.sh [--quick] [--duration S] [--rows 1000,1000000] [--profile getinfo]
# Sets up .venv (scripts/setup.sh), installs bench/requirements.txt into it, makes sure wrk is there, runs bench.py.
# pgbench (the writes' baseline) is the embedded PostgreSQL's own, from the pgserver package in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
stamp=.venv/.bench-requirements.sha256
want=$(sha256sum bench/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing bench/requirements.txt into .venv ..."
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
  echo "$want" > "$stamp"
fi
if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing wrk with apt-get ..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null || {
      apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null; }
  else
    echo "wrk is missing. Install it first, e.g. 'sudo apt-get install wrk' (Debian/Ubuntu), 'brew install wrk'" >&2
    echo "(macOS) or build it from https://github.com/wg/wrk, then run this again." >&2
    exit 2
  fi
fi
exec .venv/bin/python bench/bench.py "$@"
