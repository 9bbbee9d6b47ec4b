#!/usr/bin/env bash
# Set up and run the whole test suite (slow end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
