#!/usr/bin/env bash
# A local Azure Blob Storage for development: Azurite (the npm package, installed into
# .azurite/ by `make test`; no Docker). Prints the environment to export, serves until Ctrl-C.
#   infra/local-azure.sh [--dir DATA_DIR] [--container NAME]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "no $PY: run 'make test' or 'make demo' once to create the virtual environment" >&2
  exit 1
fi
if [ ! -x .azurite/node_modules/.bin/azurite-blob ] && ! command -v azurite-blob >/dev/null; then
  make .azurite/node_modules/.bin/azurite-blob
fi
exec "$PY" -m cloudckpt.testing.local_azure "$@"
