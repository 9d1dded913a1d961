#!/usr/bin/env bash
# A local Google Cloud Storage server for development, from PyPI (no Docker):
# fake-gcs-server. Prints the environment to export, serves until Ctrl-C.
#   infra/local-gcs.sh [--dir DATA_DIR] [--bucket NAME]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "no $PY: run 'make test' or 'make demo' once to create the virtual environment" >&2
  exit 1
fi
exec "$PY" -m cloudckpt.testing.local_gcs "$@"
