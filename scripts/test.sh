#!/usr/bin/env bash
# The whole check: set up, lint, type-check, run every test. What CI runs (.ci/run).
# Extra arguments go to pytest (e.g. scripts/test.sh -k storage); TEST_WORKERS sets the
# number of pytest-xdist workers (2; 0 runs the tests in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV=${VENV:-.venv}

# Tests use the real PostgreSQL on 127.0.0.1:5432; start the local cluster when it is down.
if command -v pg_isready >/dev/null && ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    if command -v pg_ctlcluster >/dev/null; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    fi
fi

echo "== ruff"
"$VENV/bin/ruff" check src plugins/*/src tests plugins/*/tests examples bench chaos
echo "== mypy --strict"
"$VENV/bin/mypy"
echo "== docs"
"$VENV/bin/python" docs/gen_hooks.py --check
echo "== pytest"
# Two workers (pytest-xdist): most tests wait on nginx, PHP-FPM or PostgreSQL, so two
# processes nearly halve the run on two cores. TEST_WORKERS=0 runs them in this process.
"$VENV/bin/pytest" -n "${TEST_WORKERS:-2}" "$@"
