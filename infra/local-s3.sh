#!/usr/bin/env bash
# A local S3 server for development, from PyPI (no Docker): SeaweedFS by default, or
# moto with --moto. Prints the environment to export, serves until Ctrl-C.
#   infra/local-s3.sh [--moto] [--dir DATA_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "no $PY: run 'make test' or 'make demo' once to create the virtual environment" >&2
  exit 1
fi
exec "$PY" -m cloudckpt.testing.local_s3 "$@"
