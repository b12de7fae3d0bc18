#!/usr/bin/env bash
# The test command of the README (and of CI): set-up if needed, lint, then the default test run
# (fast tests; `-m slow` / `-m real_model` select the long ones). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests
.venv/bin/python -m pytest -q "$@"
