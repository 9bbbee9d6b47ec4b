#!/usr/bin/env bash
# Set up, fetch the corpus once, run the default 3-region private simulation, print its privacy report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
export PATH="$PWD/.venv/bin:$PATH"
.venv/bin/fedpriv prepare-data
exec .venv/bin/fedpriv simulate --run-dir "${RUN_DIR:-runs/default}" "$@"
