"""The default OMoE's training step and label evaluation as the code ran them when issue 10 was filed,
run from that commit itself, against the code of now, on the same batch and prompts.

``omoe bench``'s ``omoe-full-logits`` and ``label-before`` rows rebuild the old step inside today's
package (full logits, fp32, reference kernels, the representation before issue 9). This script checks
that rebuild against the real thing: it checks out ``--commit`` (default eeb6216, the last commit
before issue 10's work) into a temporary git worktree and times both versions in fresh processes that
take turns, round after round, on the bench's SmolLM2-shaped random model (8 x 128 tokens, the last 8
supervised; 32 prompts of 64-128 tokens in batches of 8).

    .venv/bin/python scripts/bench_as_filed.py --rounds 3 --output docs/bench/as-filed.json

Prints a table (the ``.md`` beside the JSON is that printout) with each version's median over rounds
of its median step (after one untimed warm-up step) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from omoe.utils import atomic_write_text, json_text  # noqa: E402

PYTHON = sys.executable

# Run in a fresh process with PYTHONPATH set to the version's src/. argv: kind mode steps.
CHILD = r"""
import json, sys, time, torch, torch.nn.functional as F
from omoe import OMoEConfig, get_omoe_model
try:
    from omoe.models.testing import random_llama
except ImportError:  # the code as filed kept it in omoe.bench
    from omoe.bench import random_llama
from omoe.eval.batching import length_sorted_batches, pad
kind, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model, spec, device, _ = random_llama("smollm2-135m", None, None, 0)
g = torch.Generator().manual_seed(0)
ids = torch.randint(3, spec["vocab_size"], (8, 128), generator=g)  # (B, T)
labels = ids.clone()
labels[:, :120] = -100  # the last 8 tokens of each row are the response
lengths = torch.randint(64, 129, (32,), generator=g).tolist()
prompts = [torch.randint(3, spec["vocab_size"], (n,), generator=g).tolist() for n in lengths]
model = get_omoe_model(model, OMoEConfig(r=16, alpha=32))
n_tokens = int((labels[:, 1:] != -100).sum())
mask = torch.ones_like(ids)

def old_loss():  # the trainer as filed: every position's logits, fp32
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")

def new_loss():  # the trainer of now: logits at the supervised positions, precision auto
    from omoe.models.precision import autocast, autocast_dtype
    from omoe.train.loop import token_loss_sum
    with autocast(autocast_dtype("auto", device), device):
        return token_loss_sum(model, ids, mask, labels)

def old_eval():  # the label protocol's loop as filed: full logits, fp32
    for batch in length_sorted_batches([len(p) for p in prompts], 8):
        input_ids, attention_mask = pad([prompts[i] for i in batch], 0, side="right")
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        logits[torch.arange(len(batch)), attention_mask.sum(1) - 1][:, [5, 6, 7, 8]].float()

def new_eval():
    from omoe.eval.label import next_token_scores
    from omoe.models.precision import autocast, autocast_dtype
    with autocast(autocast_dtype("auto", device), device):
        next_token_scores(model, prompts, [5, 6, 7, 8], 0, 8)

if kind == "step":
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss = old_loss if mode == "old" else new_loss
    def run():
        (loss() / n_tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
else:
    model.eval()
    fn = old_eval if mode == "old" else new_eval
    def run():
        with torch.inference_mode():
            fn()
times = []
for i in range(steps + 1):
    t0 = time.perf_counter()
    run()
    if i:  # the first call is a warm-up
        times.append(time.perf_counter() - t0)
print(json.dumps(times, allow_nan=False))
"""


def _time(src: Path, kind: str, mode: str, steps: int) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "passive"))
    out = subprocess.run(
        [PYTHON, "-c", CHILD, kind, mode, str(steps)], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default="eeb6216", help="the code as filed (default: eeb6216)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each version (default 3)")
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps (evaluations) per process (default 3)"
    )
    parser.add_argument("--output", help="write the JSON here (and the table beside it as .md)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "as-filed"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.commit],
                       check=True, capture_output=True)  # fmt: skip
        try:
            runs = {(kind, mode): [] for kind in ("step", "eval") for mode in ("old", "new")}
            for round_ in range(args.rounds):
                for (kind, mode), medians in runs.items():
                    times = _time(old / "src" if mode == "old" else ROOT / "src", kind, mode, args.steps)
                    medians.append(statistics.median(times))
                    print(
                        f"  round {round_ + 1}/{args.rounds} {kind} {mode}: {times}",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    result = {kind: {mode: runs[kind, mode] for mode in ("old", "new")} for kind in ("step", "eval")}
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    meta = {"commit_as_filed": args.commit, "commit_now": head.stdout.strip(), "rounds": args.rounds,
            "steps": args.steps}  # fmt: skip
    lines = [
        f"The default OMoE as filed ({args.commit}) and now ({meta['commit_now']}), fresh processes taking "
        f"turns; per version the median over {args.rounds} rounds of the median of {args.steps} timed calls "
        "after one warm-up (each round's median in brackets)",
        "",
        "| what | as filed (s) | now (s) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for kind, name in (("step", "training step, 8 x 128 tokens"), ("eval", "label evaluation, 32 prompts")):
        o, n = (statistics.median(result[kind][m]) for m in ("old", "new"))
        rounds = {m: ", ".join(f"{t:.2f}" for t in result[kind][m]) for m in ("old", "new")}
        lines.append(f"| {name} | {o:.2f} ({rounds['old']}) | {n:.2f} ({rounds['new']}) | {o / n:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        atomic_write_text(args.output, json_text({"meta": meta, **result}, indent=2) + "\n")
        atomic_write_text(Path(args.output).with_suffix(".md"), table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
