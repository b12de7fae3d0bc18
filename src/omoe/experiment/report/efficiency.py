"""Table 3: efficiency (parameters, adapter size, generation latency and peak memory against the
base model), from the JSON of ``omoe bench --table3``."""

from __future__ import annotations

from omoe.experiment.report.loading import Results
from omoe.experiment.report.rows import Table


def table3(results: Results) -> Table:
    parts, csv_rows = [], []
    for bench in results.benches:
        meta, rows = bench["meta"], bench["results"]
        lines = [
            f"### Table 3: efficiency, {meta['device']} ({meta['preset']} shape, {meta['weights']})",
            "",
            f"Generation of {meta['batch']} prompts x {meta['new_tokens']} new tokens (greedy, prompts of "
            f"{meta['prompt_tokens']} tokens), median of {meta['rounds']} rounds; {meta['dtype']} weights; "
            f"torch {meta['torch']}. Extra memory is over the base model measured in the same run; "
            + _peak_caption(meta),
            "",
            "| method | trainable params | adapter MiB | latency s | x base | extra peak MiB | x base peak | "
            "train activations MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for r in rows:
            lines.append(
                f"| {r['method']} | {r['trainable']:,d} | {r['adapter_mib']:.1f} | {r['latency_s']:.3f} | "
                f"{r['latency_ratio']:.2f} | {_num(r.get('extra_peak_mib'), '.1f')} | "
                f"{_num(r.get('peak_ratio'), '.3f')} | {_num(r.get('train_saved_mib'), '.1f')} |"
            )
            csv_rows.append({"device": meta["device"], "preset": meta["preset"], **r})
        parts.append("\n".join(lines))
    return Table("table3", "\n\n".join(parts), csv_rows)


def _peak_caption(meta: dict) -> str:
    if not meta.get("peak_measured"):
        return "peak memory was not measured (shown as –)."
    if meta.get("peak_method", "cuda") == "cuda":
        return "peak = torch.cuda.max_memory_allocated during generation."
    return (
        "peak = parameters and buffers + the most tensor bytes alive at once during generation "
        "(CPU: torch profiler, per-op allocations)."
    )


def _num(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)
