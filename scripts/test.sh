#!/usr/bin/env bash
# The test command of the README (and of CI): set-up if needed, lint, then every test but the slow
# ones: the fast ones on a tiny random LLaMA plus the few end-to-end ones on the bundled SmolLM2
# (`-m real_model`, ~5 min). `-m slow` runs the long multi-process FSDP tests, `-m "slow or not slow"`
# everything. Extra arguments go to pytest (a later -m wins).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests
.venv/bin/python -m pytest -q -m "not slow" "$@"
