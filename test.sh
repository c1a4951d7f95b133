#!/usr/bin/env bash
# Set up (idempotent) and run the test suite: CPU only, offline.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh --browser
exec .venv/bin/python -m pytest -q "$@"
