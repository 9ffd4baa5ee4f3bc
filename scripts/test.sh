#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up, lint (ruff), types (mypy), then every test, slow ones
# included. Exits non-zero when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
status=0
echo "== ruff check"; .venv/bin/ruff check . || status=1
echo "== ruff format --check"; .venv/bin/ruff format --check . || status=1
echo "== mypy"; .venv/bin/mypy || status=1
# One worker per core, each test file on one worker (module fixtures are built once); the slowest tests
# are listed so that the suite's time (CI target: under 20 minutes) stays visible.
echo "== pytest"; .venv/bin/pytest -q -n auto --dist loadfile --durations=15 "$@" || status=1
exit $status
