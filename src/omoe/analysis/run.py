"""``omoe analyze``: how diverse are the experts of one or more trained adapters?

For each adapter and chosen layer, over the same task tokens:

- ``cos_raw``: mean pairwise cosine similarity between the experts' representations ``E_e(x)`` of
  the same token, every expert (``ExpertCapture.all_raw``, also under top-k);
- ``cos_mixed``: the same between the representations the layer actually mixes for a token (after
  Gram-Schmidt in OMoE layers; the selected experts under top-k);
- ``erank_raw`` / ``erank_mixed``: effective rank (Roy & Vetterli) of each expert's representations
  and of all experts' together;
- routing entropy of the router's softmax (nats, and divided by ``log E``), expert load (mean
  routing weight) and share of token assignments;
- a t-SNE figure coloured by expert, one row per layer, one column per adapter.

Writes ``analysis.json``, ``summary.md`` and ``tsne.png`` into the output directory, atomically,
after everything has been computed.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omoe import options
from omoe.analysis.collect import LayerRecord, choose_layers, collect
from omoe.analysis.metrics import by_expert, pairwise_cosine, rank_summary
from omoe.analysis.tsne import Panel, embed, figure
from omoe.config import CONFIG_NAME
from omoe.data.loader import load_task
from omoe.data.tasks import get_task
from omoe.errors import ConfigError
from omoe.eval.batching import progress_bar
from omoe.eval.run import load_adapter, versions
from omoe.models import load_model
from omoe.tuners.model import WEIGHTS_NAME, read_adapter_config
from omoe.utils import atomic_save_figure, atomic_write_text, json_text

VIEWS = ("mixed", "raw")
RESULT_KIND = "omoe.analysis"


@dataclass
class AnalysisSpec:
    """What to analyse; checked before any model is loaded."""

    adapters: list[str] = field(
        default_factory=list, metadata={"help": "saved adapter directory (--adapter DIR; repeat to compare)",
                                        "repeat": True},
    )  # fmt: skip
    task: str | None = field(default=None, metadata={"help": "task whose test prompts are run through the model"})
    layers: list[int] | None = field(
        default=None, metadata={"help": "block indices, e.g. 0,14,29 (default: first, middle and last MoE block)"}
    )
    tokens: int = field(default=512, metadata={"help": "analyse at least this many prompt tokens (whole prompts)"})
    output: str = field(default="runs/analysis", metadata={"help": "where analysis.json, summary.md, tsne.png go"})
    model: str | None = field(
        default=None, metadata={"help": "base model for every adapter (default: the one each adapter was trained on)"}
    )
    split: str | None = field(
        default=None, metadata={"help": "bundled split of the task (default: test, or sample where only one ships)"}
    )
    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass"})
    view: str = field(
        default="mixed", metadata={"help": f"t-SNE of the {' or '.join(VIEWS)} representations (mixed: "
                                   "orthonormalised for OMoE)"},
    )  # fmt: skip
    tsne: bool = field(default=True, metadata={"help": "draw the t-SNE figure (needs matplotlib, scikit-learn)"})
    tsne_points: int = field(default=600, metadata={"help": "points per t-SNE panel (a seeded subsample), >= 10"})
    seed: int = field(default=0, metadata={"help": "seeds the subsample and t-SNE"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:0, ..."})
    progress: bool = field(default=True, metadata={"help": "show the progress bars"})
    labels: list[str] = field(default_factory=list, metadata={"help": "a name per adapter (default: its directory)"})

    def __post_init__(self) -> None:
        if not self.adapters:
            raise ConfigError("give at least one --adapter DIR")
        if not self.task:
            raise ConfigError("give --task T: the task whose test prompts are run through the model")
        for a in self.adapters:
            path = Path(a)
            if not path.is_dir():
                raise FileNotFoundError(f"adapter directory not found: {path}")
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                if not (path / name).is_file():
                    raise FileNotFoundError(
                        f"{path} has no {name}; expected a saved omoe adapter (safetensors)"
                    )
        task = get_task(self.task)
        self.split = self.split or task.eval_split
        if self.split not in task.splits:
            raise ConfigError(
                f"task {task.name} has no bundled {self.split!r} split; it ships: {', '.join(task.splits)}"
            )
        for key in ("tokens", "batch_size"):
            options.check_int(f"--{key.replace('_', '-')}", getattr(self, key), 1)
        options.check_int("--tsne-points", self.tsne_points, 10)  # t-SNE needs a neighbourhood
        if self.view not in VIEWS:
            raise ConfigError(f"unknown --view {self.view!r}; allowed: {', '.join(VIEWS)}")
        if self.layers is not None and (not self.layers or any(b < 0 for b in self.layers)):
            raise ConfigError(f"--layers must list block indices >= 0, got {self.layers}")
        output = Path(self.output)
        if output.exists() and not output.is_dir():
            raise ConfigError(f"--output {output} is a file; give a directory")
        if not self.labels:
            self.labels = _labels(self.adapters)


def base_model_of(adapter: str | Path, override: str | None = None) -> str:
    """The base model of a saved adapter: ``override``, else ``model`` of the ``train_config.yaml``
    beside it (written by ``omoe train``), else ``base_model_name_or_path`` of its config."""
    if override:
        return override
    adapter = Path(adapter)
    if (adapter / "train_config.yaml").is_file():
        model = options.read_yaml(adapter / "train_config.yaml").get("model")
        if model:
            return str(model)
    model = read_adapter_config(adapter).get("base_model_name_or_path")
    if not model:
        raise ConfigError(f"{adapter} does not name its base model; pass --model")
    return str(model)


def analyze(spec: AnalysisSpec, model=None, tokenizer=None) -> dict:
    """Analyse every adapter of ``spec``; write and return the results (see the module docstring).

    ``model``/``tokenizer``: an in-memory base model for every adapter (tests).
    """
    start = time.perf_counter()
    records = load_task(spec.task, spec.split)
    loaded: dict[str, tuple] = {}
    adapters_out, panels = [], []
    for adapter, label in zip(spec.adapters, spec.labels):
        name = base_model_of(adapter, spec.model) if model is None else "(given)"
        if model is not None:
            base, tok = model, tokenizer
        else:
            if name not in loaded:
                loaded.clear()
                loaded[name] = load_model(name, device=spec.device)
            base, tok = loaded[name]
        wrapped = load_adapter(base, adapter)
        try:
            layer_names = choose_layers(wrapped, spec.layers)
            config = wrapped.omoe_config
            recs = collect(
                wrapped, tok, records, layer_names, spec.tokens, spec.batch_size, progress=spec.progress
            )
        finally:
            wrapped.unload()
        layers_out, column = {}, []
        for layer_name, rec in recs.items():
            summary, groups = _layer_summary(rec, spec.view)
            layers_out[layer_name] = summary
            column.append((rec, groups))
        adapters_out.append({
            "adapter": str(Path(adapter).resolve()),
            "label": label,
            "model": name,
            "method": config.method,
            "routing": _routing(config),
            "num_experts": config.num_experts,
            "top_k": config.top_k,
            "layers": layers_out,
        })  # fmt: skip
        panels.append(column)

    figure = _tsne_figure(spec, panels) if spec.tsne else None
    result = {
        "kind": RESULT_KIND,
        "task": spec.task,
        "split": spec.split,
        "tokens_requested": spec.tokens,
        "seed": spec.seed,
        "view": spec.view,
        "notes": {
            "cos_raw": "mean pairwise cosine between every expert's E_e(x) on the same token",
            "cos_mixed": "mean pairwise cosine between the representations mixed for a token "
            "(after Gram-Schmidt in OMoE layers; the selected experts under top-k)",
            "erank": "effective rank (Roy & Vetterli 2007) of each expert's representations and of all "
            "experts' together, not centred",
            "routing_entropy": "mean entropy of the router softmax in nats; normalized = / log(E)",
        },
        "adapters": adapters_out,
        "figure": "tsne.png" if figure is not None else None,
        "wall_seconds": None,
        "versions": versions(),
    }
    result["wall_seconds"] = round(time.perf_counter() - start, 3)
    out = Path(spec.output)
    if figure is not None:
        atomic_save_figure(figure, out / "tsne.png")
    result["aggregate"] = aggregate(result)
    atomic_write_text(out / "summary.md", summary_table(result) + "\n")
    atomic_write_text(out / "analysis.json", json_text(result, indent=2) + "\n")
    return result


def _layer_summary(rec: LayerRecord, view: str) -> tuple[dict, dict[int, torch.Tensor]]:
    all_raw, mixed = rec.cat(rec.all_raw), rec.cat(rec.mixed)  # (E, N, d), (S, N, d)
    indices = rec.cat(rec.indices)  # (S, N) or None
    raw_groups = by_expert(all_raw, None, rec.num_experts)
    mixed_groups = by_expert(mixed, indices, rec.num_experts)
    entropy = rec.entropy_sum / rec.tokens
    summary = {
        "block": rec.block,
        "orthogonal": rec.orthogonal,
        "tokens": rec.tokens,
        "cos_raw": pairwise_cosine(all_raw),
        "cos_mixed": pairwise_cosine(mixed),
        "erank_raw": rank_summary(raw_groups),
        "erank_mixed": rank_summary(mixed_groups),
        "routing_entropy": entropy,
        "routing_entropy_normalized": entropy / math.log(rec.num_experts) if rec.num_experts > 1 else None,
        "load": (rec.load_sum / rec.tokens).tolist(),
        "token_fraction": (rec.fraction_sum / rec.tokens).tolist(),
    }
    return summary, (mixed_groups if view == "mixed" else raw_groups)


def _tsne_figure(spec: AnalysisSpec, panels: list[list[tuple[LayerRecord, dict]]]):
    blocks = sorted({rec.name: rec.block for column in panels for rec, _ in column}.items(),
                    key=lambda kv: (kv[1], kv[0]))  # fmt: skip
    names = [n for n, _ in blocks]
    grid = [[Panel(f"no MoE layer {n}", None, None, 0) for _ in panels] for n in names]
    jobs = [
        (names.index(rec.name), c, rec, groups) for c, column in enumerate(panels) for rec, groups in column
    ]
    for r, c, rec, groups in progress_bar(jobs, "t-SNE", spec.progress):
        xy, experts = embed(groups, spec.tsne_points, spec.seed)
        grid[r][c] = Panel(rec.name, xy, experts, rec.num_experts)
    rows = [f"{n}\n({spec.view})" for n in names]
    return figure(grid, spec.labels, rows)


def summary_table(result: dict) -> str:
    """Markdown: one row per adapter and layer."""
    lines = [
        "### Expert diversity per adapter and layer",
        "",
        f"Task {result['task']} ({result['split']}), at least {result['tokens_requested']} tokens; cos = mean "
        "pairwise cosine similarity between experts (raw: every expert on the same token; mixed: what the "
        "layer mixes, after Gram-Schmidt for OMoE), signed mean / mean of |cos|; erank = effective rank, "
        "joint / mean per expert.",
        "",
        "| adapter | layer | routing | tokens | cos raw | cos mixed | erank raw | erank mixed | entropy (/log E) | load |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for a in result["adapters"]:
        for name, s in a["layers"].items():
            layer = f"{name}{'' if s['orthogonal'] else ' (vanilla)'}"
            norm = s["routing_entropy_normalized"]
            lines.append(
                f"| {a['label']} | {layer} | {a['routing']} | {s['tokens']} | {_cos(s['cos_raw'])} | "
                f"{_cos(s['cos_mixed'])} | {_rank(s['erank_raw'])} | {_rank(s['erank_mixed'])} | "
                f"{s['routing_entropy']:.3f} ({'–' if norm is None else f'{norm:.2f}'}) | "
                + " ".join(f"{x:.2f}" for x in s["load"])
                + " |"
            )
    if "aggregate" in result:
        lines += ["", aggregate_table(result["aggregate"])]
    return "\n".join(lines)


def aggregate(result: dict) -> list[dict]:
    """Per group of adapters (labels equal but for a trailing ``__seed<N>``: one method over seeds),
    the mean cosine over the analysed layers of each adapter, then mean ± sample std over the group."""
    groups: dict[str, list[dict]] = {}
    for a in result["adapters"]:
        groups.setdefault(re.sub(r"__seed\d+$", "", a["label"]), []).append(a)
    out = []
    for name, members in groups.items():
        row = {"group": name, "adapters": [a["label"] for a in members], "routing": members[0]["routing"]}
        for key in ("cos_raw", "cos_mixed"):
            per_adapter = [
                statistics.fmean(s[key]["mean"] for s in a["layers"].values() if s[key] is not None)
                for a in members
                if any(s[key] is not None for s in a["layers"].values())
            ]
            row[key] = per_adapter
            row[f"{key}_mean"] = statistics.fmean(per_adapter) if per_adapter else None
            row[f"{key}_std"] = statistics.stdev(per_adapter) if len(per_adapter) > 1 else None
        out.append(row)
    return out


def aggregate_table(rows: list[dict]) -> str:
    """Markdown of :func:`aggregate`."""
    lines = [
        "### Expert diversity per adapter group, mean over the analysed layers",
        "",
        "Per adapter, the signed mean cosine averaged over the analysed layers; then mean ± sample std over the "
        "adapters of a group (a method's seeds: labels equal but for `__seed<N>`), with each adapter's value.",
        "",
        "| group | routing | adapters | cos raw | cos mixed | cos raw per adapter |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        cells = [
            _mean_std(r["cos_raw_mean"], r["cos_raw_std"]),
            _mean_std(r["cos_mixed_mean"], r["cos_mixed_std"]),
        ]
        each = " ".join(f"{v + 0.0:+.3f}" for v in r["cos_raw"])
        lines.append(
            f"| {r['group']} | {r['routing']} | {len(r['adapters'])} | " + " | ".join(cells) + f" | {each} |"
        )
    return "\n".join(lines)


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean + 0.0:+.3f}" + ("" if std is None else f" ± {std:.3f}")


def _cos(c: dict | None) -> str:
    return "–" if c is None else f"{c['mean'] + 0.0:+.3f} / {c['mean_abs']:.3f}"


def _rank(r: dict) -> str:
    return f"{r['joint']:.1f} / {r['mean']:.1f}"


def _routing(config) -> str:
    if config.routing == "soft":
        return f"soft, {config.num_experts} experts"
    if config.routing == "switch":
        return f"switch of {config.num_experts}"
    return f"top-{config.top_k} of {config.num_experts}"


def _labels(adapters: list[str]) -> list[str]:
    """Short column titles: the adapter directories' names, with parents where they clash."""
    paths = [Path(a).resolve() for a in adapters]
    for depth in range(1, 4):
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]
