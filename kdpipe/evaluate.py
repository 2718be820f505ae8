"""`kdpipe evaluate`: test a trained model and write the metrics `dvc metrics show` reads.

metrics/<name>.json has exactly: top1 (best epoch's test Top-1, the published tables' convention),
top5 (last epoch's test Top-5; absent with 5 classes or fewer, where it is 100 % whatever the model),
top1_last, best_epoch, params_m, epochs, and `warning` only where the model has collapsed (`collapse`).
All are deterministic, so a re-run gives the same file; training time lives in logs/<name>.timing.json.
An imported teacher has no training history: its top1 is the test accuracy measured here (= top1_last),
best_epoch and epochs are the source's epoch count where the source says it, else 0.
plots/<name>.csv holds the per-epoch history for `dvc plots`: PLOT_COLUMNS, then the loss's named terms
(`loss_ce`, `loss_kd`, one per method: engine.CrossEntropy says what they are).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from . import data as data_mod
from .checkpoint import atomic_write, load_checkpoint, restore_model
from .engine import evaluate
from .runtime import Numerics, resolve_device
from .sources import open_source

PLOT_COLUMNS = ("epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5")


def collapse(final: dict, classes: list[str] | None) -> str | None:
    """Why the tested model is no classifier, or None: it predicts one class for every test image, or its Top-1
    is at or below the share of the test set's largest class (what always guessing that class scores)."""
    used = [c for c, k in enumerate(final["predicted"]) if k]
    n = sum(final["labels"])
    if len(used) == 1:
        label = classes[used[0]] if classes else used[0]
        return f"predicts one class ({label!r}) for all {n} test images"
    majority = 100 * max(final["labels"]) / n
    if final["test_top1"] <= majority:
        return (f"test Top-1 {final['test_top1']:.2f}% is at or below the majority-class rate {majority:.2f}% "
                "(always guessing the largest class scores that)")
    return None


def run(name: str, ckpt_path: Path, data_dir: Path, metrics_path: Path, plots_path: Path,
        cfg) -> dict:
    ckpt = load_checkpoint(ckpt_path, allow_not_applicable=True)
    if "not_applicable" in ckpt:  # the pipelines' N/A cell: no model to test
        metrics = {"not_applicable": ckpt["not_applicable"]}
        atomic_write(metrics_path, json.dumps(metrics, indent=2) + "\n")
        atomic_write(plots_path, ",".join(PLOT_COLUMNS) + "\n")
        return metrics
    numerics = Numerics(resolve_device(cfg.device), bf16=False, channels_last=False)  # exact fp32
    manifest = data_mod.read_manifest(data_dir)
    imported = ckpt["meta"].get("imported")
    same_data = (ckpt["dataset"] == manifest.dataset) if imported else \
        ckpt["data_sha256"] == manifest.sha256
    if ckpt["num_classes"] != manifest.num_classes or not same_data:
        raise data_mod.DataError(f"{ckpt_path}: trained on other data than {data_dir}")
    model = restore_model(ckpt).to(numerics.device)
    # the checkpoint's own input normalisation (an imported teacher's differs slightly from the data's)
    norm = ckpt.get("normalization") or manifest.normalization
    final = evaluate(model, open_source(data_dir, numerics, cfg.workers, norm).test(cfg.batch_size), counts=True)
    main = [row for row in ckpt["history"] if row["phase"] == "main"]
    if main:
        best = max(main, key=lambda row: row["test_top1"])  # first of equals: the earliest best epoch
        top1, best_epoch = best["test_top1"], best["epoch"] - (len(ckpt["history"]) - len(main))
    else:  # imported: no history
        top1, best_epoch = final["test_top1"], int(imported.get("epoch", 0))
    metrics = {
        "top1": round(top1, 2),
        "top5": round(final["test_top5"], 2) if "test_top5" in final else None,
        "top1_last": round(final["test_top1"], 2),
        "best_epoch": best_epoch,
        "params_m": ckpt["params_m"],
        "epochs": len(main) or best_epoch,
    }
    if metrics["top5"] is None:  # 5 classes or fewer: no Top-5 (keys stay in this order otherwise)
        del metrics["top5"]
    warning = collapse(final, manifest.classes)
    if warning:  # only then: a normal run's metrics keep exactly their keys
        metrics["warning"] = warning
    plotted = tuple(c for c in PLOT_COLUMNS if c != "test_top5" or "test_top5" in final)
    columns = plotted + tuple(k for k in (main[0] if main else {}) if k.startswith("loss_"))
    table = io.StringIO()
    w = csv.writer(table, lineterminator="\n")
    w.writerow(columns)
    for i, row in enumerate(main, 1):
        w.writerow([i] + [f"{row[c]:.6g}" for c in columns[1:]])
    atomic_write(metrics_path, json.dumps(metrics, indent=2) + "\n")
    atomic_write(plots_path, table.getvalue())
    return metrics
