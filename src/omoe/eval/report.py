"""Results files of ``omoe eval``: a JSON summary, a predictions JSONL beside it, a Markdown table."""

from __future__ import annotations

from pathlib import Path

from omoe.utils import atomic_write_text, json_text


def predictions_path(output: str | Path) -> Path:
    """``results.json`` -> ``results.predictions.jsonl`` (same folder, same stem)."""
    output = Path(output)
    return output.with_name(f"{output.stem}.predictions.jsonl")


def write_results(output: str | Path, results: dict, predictions: list[dict]) -> tuple[Path, Path]:
    """Write the summary JSON and the predictions JSONL (predictions first, summary last); if the
    summary cannot be written (a full disk), the predictions go too: both files or neither."""
    output = Path(output)
    preds = predictions_path(output)
    atomic_write_text(preds, "".join(json_text(p, ensure_ascii=False) + "\n" for p in predictions))
    try:
        atomic_write_text(output, json_text(results, indent=2, ensure_ascii=False) + "\n")
    except BaseException:
        preds.unlink(missing_ok=True)
        raise
    return output, preds


def markdown_table(task_metrics: list[dict]) -> str:
    """One row per task: task, protocol, prompt format, n, accuracy, acc_norm (loglik only), no-match
    count, and the most frequent prediction with its share (a model that always answers the same
    shows 100%)."""
    lines = [
        "| task | protocol | prompt | n | accuracy | acc_norm | no_match | top prediction (share) | gold majority (share) |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for m in task_metrics:
        acc_norm = f"{m['acc_norm']:.4f}" if "acc_norm" in m else "–"
        top, gold = _top_share(m.get("prediction_counts"), m["n"]), _top_share(m.get("answer_counts"), m["n"])
        lines.append(
            f"| {m['task']} | {m['protocol']} | {m.get('prompt', 'alpaca')} | {m['n']} | {m['accuracy']:.4f} "
            f"| {acc_norm} | {m['no_match']} "
            f"| {top} | {gold} |"
        )
    return "\n".join(lines)


def _top_share(counts: dict[str, int] | None, n: int) -> str:
    if not counts or not n:
        return "–"
    answer, count = max(counts.items(), key=lambda kv: kv[1])
    return f"{answer} ({100 * count / n:.0f}%)"
