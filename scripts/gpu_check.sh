#!/usr/bin/env bash
# GPU check (issue 10): one prepared run of at most ~8 minutes on a CUDA machine. It measures
#   1. `omoe bench --preset llama2-7b`: training step of the frozen base, PEFT LoRA r16, omoe LoRA r16
#      and the default OMoE, with peak memory and tokens/s (bf16 autocast, `--precision auto`);
#   2. `omoe bench --table3 --preset llama2-7b`: the paper's Table 3 (generation latency, extra memory);
#   3. the bf16 fidelity test of the OMoE representations (tests/test_numerics.py -k fidelity);
# and writes their JSON (and a log) under $GPU_CHECK_OUT (default docs/bench/gpu/). Each step has its
# own time limit, so one slow step cannot eat the others'. On a machine without CUDA it exits at once.
#   bash scripts/gpu_check.sh            # PYTHON=... to choose the interpreter (default: .venv's, else python3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing measured" >&2
    exit 1
fi
OUTDIR=${GPU_CHECK_OUT:-docs/bench/gpu}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit; a failure is reported, the rest still runs
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}
{
    "$PY" - <<'PY'
import json, platform, torch, transformers
print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "transformers": transformers.__version__, "python": platform.python_version()}))
PY
    step bench 100 "$PY" -m omoe.bench --preset llama2-7b --variants base,peft-lora,lora,omoe \
        --precision auto --rounds 2 --steps 3 --warmup 1 --output "$OUTDIR/bench-llama2-7b.json"
    step table3 170 "$PY" -m omoe.bench --table3 --preset llama2-7b --rounds 2 --output "$OUTDIR/table3-llama2-7b.json"
    OMOE_FIDELITY_JSON="$OUTDIR/fidelity.json" \
        step fidelity 50 "$PY" -m pytest -q -p no:cacheprovider tests/test_numerics.py -k fidelity
    exit "$status"
} 2>&1 | tee "$OUTDIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
