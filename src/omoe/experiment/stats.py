"""Per-record results of a cell and the paired bootstrap that compares two methods on them.

The records file (``<cell>.records.json.gz`` beside the cell's result JSON) keeps, per task, the test
records' indices and gold answers and, per protocol, each record's correctness (1/0) and, where the
protocol scores the labels (``label``), the gold label's log-probability:

    gold_logprob = log_softmax(label logits)[gold]

over the task's label logits only (the next-token logits of the labels' distinguishing tokens, see
``omoe.eval.label``), i.e. ``log p(gold | one of the labels)`` in nats, between -inf and 0. It moves
with the model's confidence even when the argmax, and so the accuracy, does not, which makes it a
far less noisy measure on a few hundred records.

The paired bootstrap (:func:`bootstrap_means`, :func:`percentile_interval`) resamples records with
replacement; a record carries its per-seed differences with it (they are averaged over the seeds
first), so the interval is over the test set, the seeds being fixed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omoe.errors import ConfigError
from omoe.utils import atomic_write, json_text

RECORDS_KIND = "omoe.experiment.records"
RECORDS_SUFFIX = ".records.json.gz"
GOLD_LOGPROB = "log_softmax over the task's label logits (label protocol), taken at the gold label; nats"
RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95


# ---------------------------------------------------------------------------- per record
def gold_logprob(scores: dict[str, float], gold: str) -> float:
    """``log_softmax(scores)[gold]``, the scores restricted to the labels; computed from the
    differences to the largest logit, so large logits lose no precision."""
    if gold not in scores:
        raise ConfigError(f"gold answer {gold!r} is not one of the scored labels {sorted(scores)}")
    values = list(scores.values())
    if any(math.isnan(v) for v in values):
        raise ConfigError("a label logit is NaN: the model's output is broken, no log-probability to record")
    top = max(values)
    return (scores[gold] - top) - math.log(math.fsum(math.exp(v - top) for v in values))


def records_path(result_path: str | Path) -> Path:
    """``dir/<cell>.records.json.gz`` for the result ``dir/<cell>.json``."""
    result_path = Path(result_path)
    return result_path.with_name(result_path.stem + RECORDS_SUFFIX)


def scored_gold(prediction: dict) -> str:
    """The gold answer as the label protocol's ``scores`` name it: ``gold_label`` (``B`` under the
    moe-peft prompt for ``answer2``), else the record's ``answer`` (alpaca, older predictions)."""
    return prediction.get("gold_label", prediction["answer"])


def records_digest(records: list[dict]) -> str:
    """A short digest of a task's test records: equal digests mean the same records in the same order."""
    text = json.dumps(records, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def records_payload(cell: str, records: dict[str, list[dict]], predictions: list[dict]) -> dict:
    """The records file's content from a cell's predictions (``omoe.eval.evaluate``, with ``task``
    and ``protocol``); ``records``: task -> the test records they were made on."""
    tasks: dict[str, dict] = {}
    for (task, protocol), preds in _by_key(predictions).items():
        preds = sorted(preds, key=lambda p: p["index"])
        entry = tasks.setdefault(
            task,
            {"digest": records_digest(records[task]), "n": len(preds), "index": [p["index"] for p in preds],
             "answer": [p["answer"] for p in preds], "protocols": {}},
        )  # fmt: skip
        if entry["index"] != [p["index"] for p in preds]:
            raise ConfigError(
                f"{cell}: protocol {protocol} scored other {task} records than the first protocol"
            )
        out = {"correct": [int(bool(p["correct"])) for p in preds]}
        if all("scores" in p for p in preds):
            out["gold_logprob"] = [round(gold_logprob(p["scores"], scored_gold(p)), 6) for p in preds]
        entry["protocols"][protocol] = out
    return {"kind": RECORDS_KIND, "cell": cell, "gold_logprob": GOLD_LOGPROB, "tasks": tasks}


def write_records(path: str | Path, payload: dict) -> None:
    """Write ``payload`` as gzip JSON, atomically, with byte-identical output for the same content."""
    data = gzip.compress(json_text(payload, ensure_ascii=False).encode("utf-8"), mtime=0)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), suffix=".gz")


@dataclass(frozen=True)
class Records:
    """One cell's per-record results on one task under one protocol."""

    digest: str | None  # None: read from a predictions file, which has no digest
    index: tuple[int, ...]
    answer: tuple[str, ...]
    correct: np.ndarray  # (n,) 1.0 / 0.0
    gold_logprob: np.ndarray | None  # (n,) nats; None when the protocol has no label scores

    def same_records(self, other: Records) -> bool:
        if self.digest is not None and other.digest is not None and self.digest != other.digest:
            return False
        return self.index == other.index and self.answer == other.answer


def parse_records(payload: dict) -> dict[tuple[str, str], Records]:
    """(task, protocol) -> Records of a records file's content."""
    out = {}
    for task, entry in payload["tasks"].items():
        for protocol, m in entry["protocols"].items():
            lp = m.get("gold_logprob")
            out[(task, protocol)] = Records(
                entry["digest"], tuple(entry["index"]), tuple(entry["answer"]),
                np.asarray(m["correct"], dtype=np.float64),
                None if lp is None else np.asarray(lp, dtype=np.float64),
            )  # fmt: skip
    return out


def read_records(path: str | Path) -> dict[tuple[str, str], Records]:
    """(task, protocol) -> Records from a records file; a broken file is a one-line error."""
    try:
        payload = json.loads(gzip.decompress(Path(path).read_bytes()).decode("utf-8"))
        if payload.get("kind") != RECORDS_KIND:
            raise ValueError(f"kind {payload.get('kind')!r}, expected {RECORDS_KIND}")
        return parse_records(payload)
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path} is not a readable records file: {err}") from None


def records_from_predictions(predictions: list[dict]) -> dict[tuple[str, str], Records]:
    """(task, protocol) -> Records from the lines of an ``eval_predictions.jsonl`` (older results);
    a (task, protocol) whose lines lack ``index``, ``answer`` or ``correct`` is left out."""
    out = {}
    for (task, protocol), preds in _by_key(predictions).items():
        if not all({"index", "answer", "correct"} <= p.keys() for p in preds):
            continue
        preds = sorted(preds, key=lambda p: p["index"])
        has_scores = all("scores" in p for p in preds)
        out[(task, protocol)] = Records(
            None, tuple(p["index"] for p in preds), tuple(p["answer"] for p in preds),
            np.asarray([float(bool(p["correct"])) for p in preds]),
            np.asarray([gold_logprob(p["scores"], scored_gold(p)) for p in preds]) if has_scores else None,
        )  # fmt: skip
    return out


def _by_key(predictions: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for p in predictions:
        out.setdefault((p.get("task"), p.get("protocol")), []).append(p)
    return out


# ---------------------------------------------------------------------------- bootstrap
def bootstrap_means(values, resamples: int = RESAMPLES, seed: int | tuple[int, ...] = SEED) -> np.ndarray:
    """Means of ``resamples`` resamples (with replacement, same size) of the rows of ``values``.

    Args:
        values: ``(n,)`` or ``(n, k)``: one row per record (e.g. the paired differences of k measures;
            the rows are resampled together, so the k measures share their resamples).
        seed: seeds numpy's generator: the same seed and n give the same resamples.

    Returns:
        ``(resamples,)`` or ``(resamples, k)``.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim not in (1, 2) or len(values) == 0:
        raise ConfigError(f"bootstrap needs (n,) or (n, k) values with n >= 1, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ConfigError("bootstrap values contain NaN or infinity")
    rng = np.random.default_rng(seed)
    columns = values.reshape(len(values), -1).T  # (k, n)
    n, out = len(values), []
    chunk = max(1, 2**22 // n)  # index matrices of at most 4M entries
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))  # (chunk, n)
        # one 1-d gather per column: several times faster than values[idx] on (n, k)
        out.append(np.stack([col[idx].mean(axis=1) for col in columns], axis=1))  # (chunk, k)
    boots = np.concatenate(out)  # (resamples, k)
    return boots if values.ndim == 2 else boots[:, 0]


def percentile_interval(samples, level: float = LEVEL) -> tuple[float, float] | np.ndarray:
    """The percentile interval: the (1 - level)/2 and (1 + level)/2 quantiles of ``samples`` (numpy's
    linear interpolation), per column; returns ``(low, high)``, or ``(2, k)`` for ``(B, k)`` samples."""
    q = np.percentile(np.asarray(samples, dtype=np.float64), [50 * (1 - level), 50 * (1 + level)], axis=0)
    return (float(q[0]), float(q[1])) if q.ndim == 1 else q


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap percentile interval."""

    mean: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def estimates(mean, boots) -> list[Estimate]:
    """One Estimate per column of ``mean`` (k,) with the percentile interval of ``boots`` (B, k)."""
    lows, highs = percentile_interval(np.asarray(boots).reshape(len(boots), -1))
    return [Estimate(float(m), float(lo), float(hi)) for m, lo, hi in zip(np.atleast_1d(mean), lows, highs)]


def paired_estimates(
    strata: list, resamples: int = RESAMPLES, seed: int = SEED, ids: list[int] | None = None
) -> list[Estimate]:
    """Mean over strata (tasks) of the per-stratum mean of paired differences, with its interval.

    ``strata``: one ``(n_t,)`` or ``(n_t, k)`` array per task (any n_t). Records are resampled within
    each task, task t's generator seeded ``(seed, ids[t])`` (default ids: 0, 1, ...), so a task gets
    the same resamples alone as in an average when it keeps its id. One Estimate per column.
    """
    ids = list(range(len(strata))) if ids is None else ids
    arrays = [np.asarray(s, dtype=np.float64).reshape(len(s), -1) for s in strata]  # (n_t, k)
    mean = np.mean([a.mean(axis=0) for a in arrays], axis=0)  # (k,)
    boots = np.mean([bootstrap_means(a, resamples, (seed, i)) for a, i in zip(arrays, ids)], axis=0)  # (B, k)
    return estimates(mean, boots)
