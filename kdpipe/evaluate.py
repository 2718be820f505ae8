"""`kdpipe evaluate`: test a trained model and write the metrics `dvc metrics show` reads.

metrics/<name>.json has exactly: top1 (best epoch's test Top-1, the published tables' convention),
top5 (last epoch's test Top-5), top1_last, best_epoch, params_m, epochs, seconds (training time).
plots/<name>.csv holds the per-epoch history for `dvc plots`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from . import data as data_mod
from .engine import Numerics, Pipeline, evaluate, load_checkpoint, resolve_device, restore_model

PLOT_COLUMNS = ("epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5")


def run(name: str, ckpt_path: Path, log_path: Path, data_dir: Path, metrics_path: Path, plots_path: Path,
        cfg) -> dict:
    ckpt = load_checkpoint(ckpt_path)
    numerics = Numerics(resolve_device(cfg.device), bf16=False, channels_last=False)  # exact fp32
    prepared = data_mod.load(data_dir, numerics.device)
    if ckpt["num_classes"] != prepared.num_classes or ckpt["data_sha256"] != prepared.manifest["sha256"]:
        raise data_mod.DataError(f"{ckpt_path}: trained on other data than {data_dir}")
    model = restore_model(ckpt).to(numerics.device)
    final = evaluate(model, prepared.test, Pipeline(prepared.manifest, numerics), cfg.batch_size)
    main = [row for row in ckpt["history"] if row["phase"] == "main"]
    best = max(main, key=lambda row: row["test_top1"])  # first of equals: the earliest best epoch
    seconds = json.loads(log_path.read_text())["seconds"] if log_path.is_file() else None
    metrics = {
        "top1": round(best["test_top1"], 2),
        "top5": round(final["test_top5"], 2),
        "top1_last": round(final["test_top1"], 2),
        "best_epoch": best["epoch"] - (len(ckpt["history"]) - len(main)),
        "params_m": ckpt["params_m"],
        "epochs": len(main),
        "seconds": seconds,
    }
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    plots_path.parent.mkdir(parents=True, exist_ok=True)
    with plots_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PLOT_COLUMNS)
        for i, row in enumerate(main, 1):
            w.writerow([i] + [f"{row[c]:.6g}" for c in PLOT_COLUMNS[1:]])
    return metrics
