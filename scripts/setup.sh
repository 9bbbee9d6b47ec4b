#!/usr/bin/env bash
# Create (or reuse) .venv and install fedpriv with its pinned dependencies.
# torch==2.13.0 is the CPU wheel; nothing else is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=23.2"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
