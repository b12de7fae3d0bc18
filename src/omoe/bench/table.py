"""The benchmark's ratios against their targets, and its printed (markdown) tables."""

from __future__ import annotations

from omoe.bench.variants import BASELINE, EvalResult, Result

# (what the ratio says, numerator row, denominator row, target): issue 10's targets, from one run
RATIOS = (
    ("speed-up of the default OMoE step", BASELINE, "omoe", ">= 2.5"),
    ("OMoE step / PEFT LoRA step", "omoe", "peft-lora", "<= 1.3"),
    ("speed-up of the label evaluation", "label-before", "label-now", ">= 2"),
    # issue 9: the exact representation may cost at most 5% over the difference of full products
    ("exact representation's step / before's", "omoe", "omoe-repr-before", "<= 1.05"),
)


def ratios(results: list[Result], evals: list[EvalResult]) -> list[dict]:
    """Issues 10's and 9's targets as ratios of times measured in this run (None where a row is missing)."""
    seconds = {r.variant: r.step_s for r in results} | {e.variant: e.seconds for e in evals}
    out = []
    for what, num, den, target in RATIOS:
        value = seconds[num] / seconds[den] if num in seconds and den in seconds else None
        op, bound = target.split()
        met = None if value is None else (value >= float(bound) if op == ">=" else value <= float(bound))
        out.append({"ratio": what, "of": f"{num} / {den}", "value": value, "target": target, "met": met})
    return out


def format_table(meta: dict, results: list[Result], evals: list[EvalResult], ratio_rows: list[dict]) -> str:
    """The run as ``omoe bench`` prints it: the training steps, the label evaluation (if timed) and
    the ratios, as markdown tables (docs/bench/*.md are this text)."""
    lines = _step_table(meta, results)
    if evals:
        lines += ["", *_eval_table(meta, evals)]
    lines += ["", *_ratio_table(ratio_rows)]
    return "\n".join(lines)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if (a is not None and b) else "-"


def _step_table(meta: dict, results: list[Result]) -> list[str]:
    ref = next((r for r in results if r.variant == "peft-lora"), None)
    lines = [
        f"Training step (forward+backward+AdamW), {meta['preset']} ({meta['layers']} blocks), batch "
        f"{meta['batch']}x{meta['seq']} ({meta['response']} supervised tokens per row), {meta['device']}, "
        f"{meta['dtype']} weights, precision {meta['precision']} = {meta['autocast']}; median of "
        f"{meta['rounds']} rounds x {meta['steps']} steps (fastest step in brackets)",
        "",
        "| variant | precision | logits | trainable | s/step | tokens/s | x PEFT LoRA | saved MiB | x PEFT LoRA "
        "| peak MiB | x PEFT LoRA |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.variant} | {r.precision} | {r.logits} | {r.trainable:,d} | {r.step_s:.4f} ({r.step_s_min:.4f}) "
            f"| {r.tokens_per_s:,.0f} | {_ratio(r.step_s, ref and ref.step_s)} | "
            f"{r.saved_mib:.1f} | {_ratio(r.saved_mib, ref and ref.saved_mib)} | "
            f"{'-' if r.peak_mib is None else f'{r.peak_mib:.0f}'} | {_ratio(r.peak_mib, ref and ref.peak_mib)} |"
        )
    return lines


def _eval_table(meta: dict, evals: list[EvalResult]) -> list[str]:
    lines = [
        f"Label-protocol evaluation of the default OMoE: {meta['eval_prompts']} prompts "
        f"({meta['eval_prompt_tokens']:,d} tokens) in batches of {meta['batch']}; median of "
        f"{meta['rounds']} rounds (fastest in brackets)",
        "",
        "| run | precision | logits | seconds | prompts/s |",
        "|---|---|---|---:|---:|",
    ]
    for e in evals:
        lines.append(
            f"| {e.variant} | {e.precision} | {e.logits} | {e.seconds:.4f} ({e.seconds_min:.4f}) "
            f"| {e.prompts_per_s:.1f} |"
        )
    return lines


def _ratio_table(ratio_rows: list[dict]) -> list[str]:
    lines = [
        "Issue 10's targets and issue 9's (stated for `--preset smollm2-135m --rounds 3` on a 2-core CPU):",
        "",
        "| ratio | of | value | target | met |",
        "|---|---|---:|---|---|",
    ]
    for row in ratio_rows:
        value = "-" if row["value"] is None else f"{row['value']:.2f}"
        met = "-" if row["met"] is None else ("yes" if row["met"] else "no")
        lines.append(f"| {row['ratio']} | {row['of']} | {value} | {row['target']} | {met} |")
    return lines
