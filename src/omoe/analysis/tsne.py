"""t-SNE maps of expert representations, coloured by expert (the OMoE paper's Fig. 1 and Figs. 5-11).

Each panel embeds a seeded random subsample of one layer's (expert, token) representations in 2-D
with scikit-learn's TSNE; panels are laid out with one row per layer and one column per adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from omoe.errors import ConfigError


@dataclass
class Panel:
    title: str
    xy: np.ndarray | None  # (M, 2), None = nothing to show
    experts: np.ndarray | None  # (M,) expert of each point
    num_experts: int


def _require_plots():
    try:
        import matplotlib
        import sklearn  # noqa: F401
    except ImportError:
        raise ConfigError("t-SNE figures need matplotlib and scikit-learn: pip install 'omoe[plots]' "
                          "(or pass --no-tsne)") from None  # fmt: skip
    matplotlib.use("Agg")


def embed(groups: dict[int, torch.Tensor], points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE of at most ``points`` representations drawn (seeded) from ``{expert: (M_e, d)}``."""
    _require_plots()
    from sklearn.manifold import TSNE

    x = torch.cat(list(groups.values())).numpy()  # (M, d)
    labels = np.concatenate([np.full(len(v), e) for e, v in groups.items()])
    rng = np.random.default_rng(seed)
    if len(x) > points:
        keep = np.sort(rng.choice(len(x), size=points, replace=False))
        x, labels = x[keep], labels[keep]
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(x.astype(np.float32)), labels


def figure(panels: list[list[Panel]], column_titles: list[str], row_titles: list[str]):
    """A matplotlib Figure: ``panels[row][column]``."""
    _require_plots()
    import matplotlib.pyplot as plt

    rows, cols = len(panels), len(panels[0])
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(column_titles[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(row_titles[r], fontsize=9)
            if panel.xy is None:
                ax.text(0.5, 0.5, panel.title, ha="center", va="center", fontsize=8, transform=ax.transAxes)
                continue
            for e in range(panel.num_experts):
                sel = panel.experts == e
                if sel.any():
                    ax.scatter(panel.xy[sel, 0], panel.xy[sel, 1], s=4, alpha=0.7, color=cmap(e % 10),
                               label=f"expert {e}")  # fmt: skip
            ax.legend(fontsize=6, markerscale=2, loc="best")
    fig.tight_layout()
    return fig
