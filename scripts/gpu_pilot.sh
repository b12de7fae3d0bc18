#!/usr/bin/env bash
# Issue 11's pilot on a CUDA machine: learning curves of the bundled model on every task's validation
# slice, one process per task in parallel (scripts/pilot_learning.py: LoRA on every block, lr 5e-4,
# 2000 steps of 16, the paper's protocol; the CPU pilots in docs/pilot/ learn nothing in 300 steps of 8,
# so the first question for a GPU is whether any task leaves its majority rate with ~30k examples). Each process starts no new run after $BUDGET_S seconds and
# is stopped after $LIMIT_S; finished runs are kept. Writes OUTDIR/pilot.json (all tasks) and pilot.log.
#   bash scripts/gpu_pilot.sh OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_pilot.sh OUTDIR}
PY=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
"$PY" -c "from omoe.models.loading import load_model; load_model()" >/dev/null 2>&1 || {
    echo "gpu_pilot: the bundled model does not load here" >&2; exit 1; }
tasks=(piqa social_i_qa ARC-Easy boolq winogrande openbookqa hellaswag ARC-Challenge)
for t in "${tasks[@]}"; do
    timeout --signal=KILL "${LIMIT_S:-230}" "$PY" scripts/pilot_learning.py --tasks "$t" --methods "${METHODS:-lora}" \
        --lrs "${LRS:-5e-4}" --steps "${STEPS:-2000}" --eval-every 250 --batch 16 --val-records 400 \
        --budget-s "${BUDGET_S:-150}" --output "$out/pilot-$t.json" >"$out/pilot-$t.log" 2>&1 &
done
wait
for t in "${tasks[@]}"; do echo "### $t"; grep -v "Loading weights" "$out/pilot-$t.log"; done >"$out/pilot.log"
"$PY" - "$out" "${tasks[@]}" <<'PY'
import json, sys
from pathlib import Path
out, tasks = Path(sys.argv[1]), sys.argv[2:]
merged = {"settings": None, "tasks": {}, "runs": []}
for t in tasks:
    f = out / f"pilot-{t}.json"
    if f.exists():
        part = json.loads(f.read_text())
        merged["settings"] = merged["settings"] or {k: v for k, v in part["settings"].items() if k not in ("tasks", "output")}
        merged["tasks"].update(part["tasks"]); merged["runs"] += part["runs"]
(out / "pilot.json").write_text(json.dumps(merged, indent=1, allow_nan=False))
PY
rm -f "$out"/pilot-*.json "$out"/pilot-*.log
