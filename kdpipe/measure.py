"""`kdpipe measure`: what a shipped model costs on this machine's CPU, beside what it scores.

For each models/NAME.onnx (NAME a run, or NAME.int8 from `kdpipe quantize`): onnxruntime's CPU provider with
`measure.threads` intra-op threads (one inter-op thread, sequential), batch-1 latency p50/p95 (ms) over
`measure.runs` runs after `measure.warmup`, images/s at `measure.batch_size`, the file's size, and the
parameters and MACs of the PyTorch model models/BASE.pt (BASE = NAME without `.int8`; MACs counted by
`torch.utils.flop_counter.FlopCounterMode` at the data's image size: convolutions and matrix products, MACs =
FLOPs / 2). The accuracy of each point: fp32, metrics/NAME.json `top1_last` (the last epoch: the exported
weights) and `top5`; int8, metrics/NAME.int8.json. Writes metrics/measure.json ({name: {...}, "_machine": {...}})
and plots/pareto.csv (name, precision, latency_ms, top1, pareto: 1 on the front of lower latency / higher Top-1).
Timings depend on the machine and its load: measure.json is not a deterministic output.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_write, load_checkpoint, model_path, restore_model
from .config import Error
from .quantize import _need_ort, load_export, onnx_path, session
from .runtime import Numerics
from .sources import open_source

INT8 = ".int8"


class MeasureError(Error):
    pass


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (latency, top1) points: True where no other point is as fast or faster and as accurate or more, and
    strictly better in one of the two (equal points are both on the front)."""
    return [not any(l2 <= lat and t2 >= top and (l2 < lat or t2 > top) for l2, t2 in points)
            for lat, top in points]


def macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one image through `model` (eval mode), as torch's FlopCounterMode counts them
    (convolutions and matrix products; FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() // 2


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int) -> dict:
    import onnxruntime

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__, "threads": threads,
            "platform": platform.platform()}


def latencies_ms(sess, x: np.ndarray, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        sess.run(["logits"], {"image": x})
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(["logits"], {"image": x})
        out.append((time.perf_counter() - t) * 1000)
    return out


def images_per_s(sess, x: np.ndarray, repeats: int) -> float:
    """len(x) / the median time of one batch, after two untimed batches."""
    times = latencies_ms(sess, x, 2, repeats)
    return len(x) / (statistics.median(times) / 1000)


def accuracy(name: str, metrics_dir: Path) -> dict:
    """The Top-1/Top-5 of the model file NAME: its run's last epoch (fp32), or its INT8 test (NAME.int8)."""
    f = metrics_dir / f"{name}.json"
    if not f.is_file():
        how = f"kdpipe quantize {name.removesuffix(INT8)}" if name.endswith(INT8) else f"kdpipe evaluate {name}"
        raise MeasureError(f"{f}: no metrics for {name} (run `{how}` first)")
    m = json.loads(f.read_text())
    top1 = m["top1"] if name.endswith(INT8) else m.get("top1_last")
    if top1 is None:
        raise MeasureError(f"{f}: holds no Top-1 ({', '.join(m) or 'empty'})")
    return {"top1": top1, "top5": m.get("top5")}


def measure(names: list[str], data_dir: Path, metrics_dir: Path, out: Path, pareto_csv: Path, cfg) -> dict:
    _need_ort()
    if len(set(names)) != len(names):
        raise MeasureError(f"a model named twice: {' '.join(names)}")
    for name in names:
        if not onnx_path(name).is_file():
            base = name.removesuffix(INT8)
            how = f"kdpipe quantize {base}" if name.endswith(INT8) else f"kdpipe export {name}"
            raise MeasureError(f"{onnx_path(name)}: not found (run `{how}` first)")
    points = {name: accuracy(name, metrics_dir) for name in names}
    source = open_source(data_dir, Numerics(torch.device("cpu"), bf16=False, channels_last=False), workers=0)
    size = source.manifest.image_size
    for name in names:  # each file kdpipe's export contract at this data's size, before timing any
        shape = [d.dim_value for d in load_export(onnx_path(name), MeasureError).graph.input[0].type.tensor_type.shape.dim]
        if shape[1:] != [3, size, size]:
            raise MeasureError(f"{onnx_path(name)}: takes {'x'.join(map(str, shape[1:]))} images, but {data_dir} "
                               f"holds 3x{size}x{size}")
    pixels = next(iter(source.test_pixels(cfg.batch_size)))[0]
    batch = (pixels.float() / 255).numpy()
    batch = np.ascontiguousarray(np.resize(batch, (cfg.batch_size,) + batch.shape[1:]))  # repeated where fewer
    one = np.ascontiguousarray(batch[:1])
    results = {}
    for name in names:
        base = name.removesuffix(INT8)
        ckpt = load_checkpoint(model_path(base))
        model = restore_model(ckpt)
        n_params, n_macs = sum(p.numel() for p in model.parameters()), macs(model, size)
        sess = session(onnx_path(name), cfg.threads)
        lat = latencies_ms(sess, one, cfg.warmup, cfg.runs)
        p50, p95 = (float(v) for v in np.percentile(lat, [50, 95]))
        size_bytes = os.path.getsize(onnx_path(name))
        results[name] = {
            "precision": "int8" if name.endswith(INT8) else "fp32",
            "top1": points[name]["top1"], "top5": points[name]["top5"],
            "latency_ms_p50": round(p50, 3), "latency_ms_p95": round(p95, 3),
            "images_per_s": round(images_per_s(sess, batch, max(3, cfg.runs // 10)), 1),
            "batch_size": cfg.batch_size, "size_bytes": size_bytes, "size_mb": round(size_bytes / 1e6, 4),
            "params": n_params, "params_m": round(n_params / 1e6, 4), "macs": n_macs, "macs_g": round(n_macs / 1e9, 4),
        }
    for name, r in results.items():  # INT8 vs its fp32 file, where both were measured
        fp = results.get(name.removesuffix(INT8)) if name.endswith(INT8) else None
        if fp:
            r["speedup_vs_fp32"] = round(fp["latency_ms_p50"] / r["latency_ms_p50"], 2)
    front = pareto_front([(r["latency_ms_p50"], r["top1"]) for r in results.values()])
    for r, on in zip(results.values(), front):
        r["pareto"] = on  # the report draws the front from this (it never imports the measuring code)
    doc = {**results, "_machine": {**machine(cfg.threads), "warmup": cfg.warmup, "runs": cfg.runs,
                                   "image_size": size}}
    table = io.StringIO()
    w = csv.writer(table, lineterminator="\n")
    w.writerow(["name", "precision", "latency_ms", "top1", "pareto"])
    for (name, r), on in zip(results.items(), front):
        w.writerow([name, r["precision"], r["latency_ms_p50"], r["top1"], int(on)])
    atomic_write(out, json.dumps(doc, indent=2) + "\n")
    atomic_write(pareto_csv, table.getvalue())
    return doc
