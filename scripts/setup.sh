#!/usr/bin/env bash
# Create (or reuse) .venv and install fedpriv with its pinned dependencies.
# torch==2.13.0 is the CPU wheel; nothing else is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "fedpriv setup: creating .venv"
  "$PY" -m venv .venv
fi
echo "fedpriv setup: installing fedpriv and its pinned dependencies into .venv (the first time takes a few minutes)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=23.2"
# setuptools' "Editable installation ... Please be careful with folders in your working directory"
# notice (a flat layout is installed through a meta path finder) is shown by pip as a
# BuildBackendWarning banner that fills the first screen; it is information only. Ignore that
# one message, for this pip call only.
PYTHONWARNINGS="ignore:Editable installation." \
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
echo "fedpriv setup: done"
