"""The report's figures (matplotlib, Agg): accuracy per epoch, small multiples per pair, the Δ Top-1 heat map and
the Top-1 vs latency plot with its Pareto front. Saved without a Software tag, so the same data give the same bytes."""

from __future__ import annotations

import csv
from pathlib import Path


def plot(rows: list[dict], plots_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        with (plots_dir / f"{r['name']}.csv").open() as f:
            hist = list(csv.DictReader(f))
        ax.plot([int(h["epoch"]) for h in hist], [float(h["test_top1"]) for h in hist], label=r["name"])
    many = len(rows) > 10
    ax.legend(fontsize=6 if many else None, ncol=2 if many else 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test Top-1 (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)


def pareto_plot(measured: dict, out: Path) -> None:
    """Top-1 against batch-1 latency (log scale), a labelled point per model, the Pareto front as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(measured)
    pts = [(measured[n]["latency_ms_p50"], measured[n]["top1"]) for n in names]
    front = sorted(p for n, p in zip(names, pts) if measured[n].get("pareto"))  # as `kdpipe measure` found it
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, (x, y) in zip(names, pts):
        ax.scatter([x], [y], marker="s" if measured[n]["precision"] == "int8" else "o", zorder=3)
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("batch-1 latency p50 (ms, log scale)")
    ax.set_ylabel("test Top-1 (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)


def curves_by_pair(panels: list[tuple[str, list[tuple[str, str]]]], plots_dir: Path, out: Path, title: str) -> None:
    """Small multiples: a panel per pair (and one for the ResNet table), a colour per label across panels,
    one legend for the figure: readable at 13 pairs x 16 runs, where one plot with a legend entry per run is not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for _, runs in panels for label, _ in runs))
    colours = {label: plt.get_cmap("tab20")(i % 20) for i, label in enumerate(labels)}
    ncols = min(4, max(len(panels), 1))
    nrows = -(-max(len(panels), 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.8 * nrows + 0.8), squeeze=False)
    drawn = {}
    for ax, (panel, runs) in zip(axes.flat, panels):
        for label, name in runs:
            f = plots_dir / f"{name}.csv"
            if not f.is_file():
                continue
            with f.open() as fh:
                hist = list(csv.DictReader(fh))
            style = "--" if label in ("teacher", "student (baseline)") else "-"
            drawn[label] = ax.plot([int(h["epoch"]) for h in hist], [float(h["test_top1"]) for h in hist], style,
                                   color=colours[label], lw=1)[0]
        ax.set_title(panel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    if drawn:
        fig.legend(list(drawn.values()), list(drawn), loc="lower center", ncol=min(len(drawn), 8), fontsize=7,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.012 * (len(drawn) // 8) if drawn else 0, 1, 1))
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)


def heatmap(deltas: dict[str, dict[int, float]], methods: list[str], labels: list[str], pair_labels: list[str],
            out: Path) -> None:
    """Δ Top-1 over the student baseline, mean over seeds: methods x pairs, blank where not run or N/A."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((max(len(methods), 1), max(len(pair_labels), 1)), np.nan)
    for i, m in enumerate(methods):
        for j, v in deltas[m].items():
            grid[i, j] = v
    span = max(float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 0.0, 0.5)
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(pair_labels), 1.5 + 0.42 * max(len(methods), 1)))
    image = ax.imshow(grid, cmap="RdBu", vmin=-span, vmax=span, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(pair_labels)), pair_labels, rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(methods)), labels, fontsize=8)
    fig.colorbar(image, ax=ax, label="Δ Top-1 over the baseline (%)")
    fig.tight_layout()
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)
