"""`kdpipe report`: the results table (published format) and accuracy-per-epoch plot, from DVC outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

# Published results for this design: (params C10, params C100, C10 top1, C10 top5, C100 top1, C100 top5)
PUBLISHED = {
    "resnet20": (0.27, 0.28, 91.70, 99.71, 67.86, 90.11),
    "resnet32": (0.47, 0.47, 92.93, 99.73, 69.96, 90.81),
    "resnet44": (0.66, 0.67, 93.32, 99.76, 70.56, 91.33),
    "resnet56": (0.86, 0.86, 93.63, 99.75, 71.09, 91.56),
    "resnet110": (1.73, 1.74, 93.77, 99.78, 71.85, 91.36),
}


def published(model: str, dataset: str):
    """(top1, top5) published for `model` on `dataset`, or None."""
    row = PUBLISHED.get(model)
    if row is None or dataset not in ("cifar10", "cifar100"):
        return None
    return row[2:4] if dataset == "cifar10" else row[4:6]


def pretty(model: str) -> str:
    return "ResNet-" + model.removeprefix("resnet")


def collect(names: list[str], metrics_dir: Path, logs_dir: Path) -> list[dict]:
    rows = []
    for name in names:
        m = json.loads((metrics_dir / f"{name}.json").read_text())
        info = json.loads((logs_dir / f"{name}.json").read_text())
        rows.append({"name": name, **info, **m})
    return rows


def table(rows: list[dict], dataset: str) -> str:
    with_pub = dataset in ("cifar10", "cifar100")
    head = ["Model", "Param (M)", "Top1 (%)", "Top5 (%)", "Top1 last (%)", "Δ Top1 vs student"]
    if with_pub:
        head += ["Published Top1 / Top5"]
    base = next((r["top1"] for r in rows if r["role"] == "student"), None)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        label = f"{pretty(r['model'])} ({r['role'] if r['role'] != 'distill' else r['method']})"
        delta = f"{r['top1'] - base:+.2f}" if r["role"] == "distill" and base is not None else ""
        cells = [label, f"{r['params_m']:.2f}", f"{r['top1']:.2f}", f"{r['top5']:.2f}", f"{r['top1_last']:.2f}", delta]
        if with_pub:
            pub = published(r["model"], dataset)
            cells.append(f"{pub[0]:.2f} / {pub[1]:.2f}" if pub else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], plots_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        with (plots_dir / f"{r['name']}.csv").open() as f:
            hist = list(csv.DictReader(f))
        ax.plot([int(h["epoch"]) for h in hist], [float(h["test_top1"]) for h in hist], label=r["name"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test Top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)


def write(names: list[str], manifest: dict, metrics_dir: Path, logs_dir: Path, plots_dir: Path, out_dir: Path) -> str:
    rows = collect(names, metrics_dir, logs_dir)
    dataset = manifest["dataset"]
    text = (f"# kdpipe results — {dataset}\n\n"
            f"Data: {manifest['train_size']} train / {manifest['test_size']} test images, "
            f"{manifest['num_classes']} classes ({manifest['source']}).\n"
            "Top1 is the best epoch's test Top-1, Top5 the last epoch's test Top-5 (the published convention); "
            "Top1 last is the last epoch's Top-1.\n\n" + table(rows, dataset) + "\n\n![test accuracy](accuracy.png)\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(text)
    plot(rows, plots_dir, out_dir / "accuracy.png")
    return text
