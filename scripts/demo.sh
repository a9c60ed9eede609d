#!/usr/bin/env bash
# The README's demo command for a fresh machine: set everything up (nginx and the other
# system packages via apt when missing and root, the venv, every distribution in editable
# mode), then run `nxmesh demo`: a master on embedded SQLite, an agent supervising a real
# nginx, the quickstart site applied, fetched through nginx, and a change rolled out.
# Extra arguments go to `nxmesh demo` (e.g. scripts/demo.sh --keep-running).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/nxmesh" demo "$@"
