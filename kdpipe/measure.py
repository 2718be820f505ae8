"""`kdpipe measure`: what a shipped model costs on this machine's CPU, beside what it scores.

For each models/NAME.onnx (NAME a run, or an INT8 file of one: NAME.int8 from `kdpipe quantize`, NAME.qat from
`kdpipe qat`): onnxruntime's CPU provider with
`measure.threads` intra-op threads (one inter-op thread, sequential). The models are timed interleaved, so that a
slow spell of the machine falls on all of them: `measure.rounds` rounds, each visiting every model (in an order
rotated from round to round) for `measure.runs` batch-1 runs and a few batches of `measure.batch_size`. Per
model: batch-1 latency p50/p95 (ms) over all its runs, the median of its rounds' p50s and their interquartile
range (the spread the Pareto front takes as noise), images/s (median and IQR over rounds); the file's size, and the
parameters and MACs of the PyTorch model models/BASE.pt (BASE = NAME without `.int8`/`.qat`; MACs counted by
`torch.utils.flop_counter.FlopCounterMode` at the data's image size: convolutions and matrix products, MACs =
FLOPs / 2). The accuracy of each point: fp32, metrics/NAME.json `top1_last` (the last epoch: the exported
weights) and `top5`; int8, metrics/NAME.int8.json (.qat.json). Writes metrics/measure.json ({name: {...}, "_machine": {...}})
and plots/pareto.csv (name, precision, latency_ms, top1, pareto: 1 on the front of lower latency / higher Top-1,
counting a latency difference only where it exceeds the measured spread, and files of one graph as one latency).
Timings depend on the machine and its load: measure.json is not a deterministic output. It records the machine
(CPU, the instruction sets that decide INT8 speed, the cores this process may use, threads, onnxruntime), the
load average before and after, and how long the measurement waited for another `kdpipe measure` on the machine
(a lock serialises them: two measurements at once would each record the other's load).
"""

from __future__ import annotations

import contextlib
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
from .names import INT8_FILES, model_file
from .quantize import _need_ort, cpu_flags, load_export, onnx_path, session
from .runtime import Numerics
from .sources import open_source

class MeasureError(Error):
    pass


def pareto_front(points: list[tuple[float, float]], spreads: list[float] | None = None,
                 classes: list | None = None) -> list[bool]:
    """For (latency, top1) points: True where no other point dominates it: as accurate or more, not slower, and
    strictly better in one of the two (equal points are both on the front). With `spreads` (each latency's noise,
    e.g. its IQR over rounds) a latency is lower only by more than the larger of the two spreads, and equal within
    it; with `classes` (e.g. the graph's hash) points of one class have one latency, whatever was timed."""
    n = len(points)
    spreads = spreads or [0.0] * n
    classes = classes or list(range(n))

    def faster(i, j):  # 1: i clearly faster than j, 0: the same within noise, -1: clearly slower
        if classes[i] == classes[j]:
            return 0
        gap, noise = points[j][0] - points[i][0], max(spreads[i], spreads[j])
        return 1 if gap > noise else -1 if -gap > noise else 0

    def dominates(i, j):
        speed = faster(i, j)
        return speed >= 0 and points[i][1] >= points[j][1] and (speed > 0 or points[i][1] > points[j][1])

    return [not any(dominates(i, j) for i in range(n) if i != j) for j in range(n)]


def graph_class(proto) -> str:
    """The hash of an ONNX graph without its weights' values and its metadata: files of one architecture (and
    precision) share it, whatever they were trained to; they run the same kernels, so their latency is one."""
    import hashlib

    graph = type(proto.graph)()
    graph.CopyFrom(proto.graph)
    for t in graph.initializer:
        dims, dtype = list(t.dims), t.data_type
        t.Clear()
        t.dims.extend(dims)
        t.data_type = dtype
    graph.name = ""
    return hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()[:16]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = (float(v) for v in np.percentile(values, [25, 50, 75]))
    return q1, q2, q3


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


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo's words that decide INT8 speed


def machine(threads: int) -> dict:
    """The CPU (model, the instruction sets INT8 kernels use: VNNI's u8 x s8 dot products, AMX), the cores this
    process may use (its affinity, which a container or taskset limits, not the machine's count), onnxruntime."""
    import onnxruntime

    words = cpu_flags()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_name(), "isa": [f for f in ISA_FLAGS if f in words], "cores_available": cores,
            "cores_machine": os.cpu_count(), "onnxruntime": onnxruntime.__version__, "threads": threads,
            "platform": platform.platform()}


@contextlib.contextmanager
def machine_lock():
    """One `kdpipe measure` at a time on this machine (a lock file in the temp folder, across processes and
    projects: `dvc queue start -j 2` runs two experiments at once); yields the seconds waited."""
    import fcntl
    import tempfile

    t = time.perf_counter()
    with open(Path(tempfile.gettempdir()) / "kdpipe-measure.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.perf_counter() - t
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
    """len(x) / the median time of one batch, after one untimed batch."""
    times = latencies_ms(sess, x, 1, repeats)
    return len(x) / (statistics.median(times) / 1000)


def interleaved(sessions: dict, one: np.ndarray, batch: np.ndarray, cfg) -> dict:
    """`cfg.rounds` rounds over the models, each in another order (rotated), each visit `cfg.runs` batch-1 runs and
    a few batches: {name: (all batch-1 latencies in ms, each round's p50, each round's images/s)}."""
    names = list(sessions)
    for name in names:  # warm-up, once, before any timing
        latencies_ms(sessions[name], one, cfg.warmup, 0)
    out = {name: ([], [], []) for name in names}
    for r in range(cfg.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            lat = latencies_ms(sessions[name], one, 1, cfg.runs)
            out[name][0].extend(lat)
            out[name][1].append(statistics.median(lat))
            out[name][2].append(images_per_s(sessions[name], batch, max(3, cfg.runs // 10)))
    return out


def accuracy(name: str, metrics_dir: Path) -> dict:
    """The Top-1/Top-5 of the model file NAME: its run's last epoch (fp32), or its INT8 test (NAME.int8, NAME.qat)."""
    f = metrics_dir / f"{name}.json"
    base, int8 = model_file(name)
    if not f.is_file():
        how = f"{INT8_FILES[int8]} {base}" if int8 else f"kdpipe evaluate {name}"
        raise MeasureError(f"{f}: no metrics for {name} (run `{how}` first)")
    m = json.loads(f.read_text())
    top1 = m["top1"] if int8 else m.get("top1_last")
    if top1 is None:
        raise MeasureError(f"{f}: holds no Top-1 ({', '.join(m) or 'empty'})")
    return {"top1": top1, "top5": m.get("top5")}


def measure(names: list[str], data_dir: Path, metrics_dir: Path, out: Path, pareto_csv: Path, cfg) -> dict:
    _need_ort()
    if len(set(names)) != len(names):
        raise MeasureError(f"a model named twice: {' '.join(names)}")
    for name in names:
        if not onnx_path(name).is_file():
            base, int8 = model_file(name)
            how = f"{INT8_FILES[int8]} {base}" if int8 else f"kdpipe export {name}"
            raise MeasureError(f"{onnx_path(name)}: not found (run `{how}` first)")
    points = {name: accuracy(name, metrics_dir) for name in names}
    source = open_source(data_dir, Numerics(torch.device("cpu"), bf16=False, channels_last=False), workers=0)
    size = source.manifest.image_size
    # each file kdpipe's export contract at this data's size, before timing any; its graph's class (weights aside)
    classes = {name: graph_class(load_export(onnx_path(name), data_dir, size, MeasureError)) for name in names}
    pixels = next(iter(source.test_pixels(cfg.batch_size)))[0]
    batch = (pixels.float() / 255).numpy()
    batch = np.ascontiguousarray(np.resize(batch, (cfg.batch_size,) + batch.shape[1:]))  # repeated where fewer
    one = np.ascontiguousarray(batch[:1])
    results = {}
    for name in names:
        base, int8 = model_file(name)
        model = restore_model(load_checkpoint(model_path(base)))
        n_params, n_macs = sum(p.numel() for p in model.parameters()), macs(model, size)
        size_bytes = os.path.getsize(onnx_path(name))
        results[name] = {
            "precision": "int8" if int8 else "fp32",
            "top1": points[name]["top1"], "top5": points[name]["top5"],
            "batch_size": cfg.batch_size, "size_bytes": size_bytes, "size_mb": round(size_bytes / 1e6, 4),
            "params": n_params, "params_m": round(n_params / 1e6, 4), "macs": n_macs, "macs_g": round(n_macs / 1e9, 4),
            "graph": classes[name],
        }
    sessions = {name: session(onnx_path(name), cfg.threads) for name in names}
    with machine_lock() as waited:
        load_before = os.getloadavg()
        timed = interleaved(sessions, one, batch, cfg)
        load_after = os.getloadavg()
    for name, (lat, round_p50, round_ips) in timed.items():
        p50, p95 = (float(v) for v in np.percentile(lat, [50, 95]))
        q1, median, q3 = quartiles(round_p50)
        i1, ips, i3 = quartiles(round_ips)
        results[name].update({
            "latency_ms_p50": round(p50, 3), "latency_ms_p95": round(p95, 3),
            "latency_ms_rounds_median": round(median, 3), "latency_ms_iqr": round(q3 - q1, 3),
            "images_per_s": round(ips, 1), "images_per_s_iqr": round(i3 - i1, 1), "rounds": cfg.rounds})
    for name, r in results.items():  # INT8 vs its fp32 file, where both were measured
        base, int8 = model_file(name)
        fp = results.get(base) if int8 else None
        if fp:
            r["speedup_vs_fp32"] = round(fp["latency_ms_p50"] / r["latency_ms_p50"], 2)
    front = pareto_front([(r["latency_ms_p50"], r["top1"]) for r in results.values()],
                         [r["latency_ms_iqr"] for r in results.values()], [r["graph"] for r in results.values()])
    for r, on in zip(results.values(), front):
        r["pareto"] = on  # the report draws the front from this (it never imports the measuring code)
    doc = {**results, "_machine": {**machine(cfg.threads), "warmup": cfg.warmup, "runs": cfg.runs, "rounds": cfg.rounds,
                                   "image_size": size, "load_average_before": [round(v, 2) for v in load_before],
                                   "load_average_after": [round(v, 2) for v in load_after],
                                   "waited_for_another_measure_s": round(waited, 1)}}
    table = io.StringIO()
    w = csv.writer(table, lineterminator="\n")
    w.writerow(["name", "precision", "latency_ms", "top1", "pareto"])
    for (name, r), on in zip(results.items(), front):
        w.writerow([name, r["precision"], r["latency_ms_p50"], r["top1"], int(on)])
    atomic_write(out, json.dumps(doc, indent=2) + "\n")
    atomic_write(pareto_csv, table.getvalue())
    return doc
