"""`kdpipe quantize`: post-training static INT8 of an exported model (models/NAME.onnx -> models/NAME.int8.onnx).

onnxruntime's own tooling, on the very file `kdpipe export` ships: `quant_pre_process` (shape inference and
graph optimisation, as onnxruntime recommends), then `quantize_static` in QDQ format with uint8 activations and
int8 weights (per channel where `quantize.per_channel`), calibrated on `quantize.calibration_images` training
images (the evaluation view, no augmentation) drawn by `quantize.seed`. The INT8 file keeps the input/output
contract (`image` float32 RGB in [0, 1], NCHW; `logits`) and the fp32 file's metadata, plus
`kdpipe.quantization` (the settings). Then both files are tested with onnxruntime on the whole prepared test set
and metrics/NAME.int8.json records the INT8 Top-1/Top-5, the fp32 ONNX's, and the drop.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write
from .config import Error
from .runtime import Numerics
from .sources import open_source

CALIBRATION_BATCH = 32
EVAL_BATCH = 256


class QuantizeError(Error):
    pass


def onnx_path(name: str) -> Path:
    return Path(f"models/{name}.onnx")


def _need_ort():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise QuantizeError("quantize and measure need the export extra: pip install -e '.[export]'") from None


def load_export(path: Path, data_dir: Path, size: int, error=QuantizeError):
    """The ONNX file `kdpipe export` wrote at `path` (its proto), or `error` in one line: a file that is not ONNX,
    or whose contract is not kdpipe's (one input `image`, float32, N x 3 x S x S; one output `logits`), or whose S
    is not the image size `size` of the data in `data_dir`."""
    import onnx

    try:
        proto = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError, a truncated file, ...
        raise error(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    inputs = [(i.name, i.type.tensor_type.elem_type, len(i.type.tensor_type.shape.dim)) for i in proto.graph.input]
    if inputs != [("image", onnx.TensorProto.FLOAT, 4)] or [o.name for o in proto.graph.output] != ["logits"]:
        raise error(f"{path}: not a kdpipe export (one input `image`, float32 N x 3 x S x S; one output `logits`)")
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]]
    if shape != [3, size, size]:
        raise error(f"{path}: takes {'x'.join(map(str, shape))} images, but {data_dir} holds 3x{size}x{size}")
    return proto


def session(path: Path, threads: int):
    """An onnxruntime CPU session: `threads` intra-op threads, one inter-op thread, sequential execution."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def calibration_indices(train_size: int, n: int, seed: int) -> list[int]:
    """`n` training images (all, where there are fewer) drawn by `seed`, in file order."""
    perm = torch.randperm(train_size, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:min(n, train_size)].tolist())


# the nodes the guard may keep in fp32: those with weights (a network has a few dozen; each costs a quantization to
# weigh), whose fp32 fallback also keeps their inputs unquantized
CANDIDATE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def held_out_batches(source, idx: list[int]):
    """(uint8 pixels, labels) batches of the training images `idx` (evaluation view), read a batch at a time."""
    labels = torch.as_tensor(source.train_labels).cpu()
    for i in range(0, len(idx), EVAL_BATCH):
        chunk = idx[i:i + EVAL_BATCH]
        yield source.train_pixels(chunk), labels[chunk]


def top_k(session_, batches) -> dict:
    """Top-1 and Top-5 (%) of an onnxruntime session over uint8 (x, y) batches (fed as pixels / 255), counted as
    the engine's evaluate counts them (`topk`: the first of equal logits wins)."""
    top1, top5, n, classes = 0, 0, 0, 0
    for x, y in batches:
        logits = torch.from_numpy(session_.run(["logits"], {"image": (x.float() / 255).numpy()})[0])
        classes = logits.shape[1]
        hits = logits.topk(min(5, classes), 1).indices == y[:, None]
        top1, top5, n = top1 + int(hits[:, 0].sum()), top5 + int(hits.any(1).sum()), n + len(y)
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "classes": classes}


def _reader(source, idx: list[int]):
    """The calibration images, read a batch at a time from the source (never the whole set in memory)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.chunks = iter([idx[i:i + CALIBRATION_BATCH] for i in range(0, len(idx), CALIBRATION_BATCH)])

        def get_next(self):
            chunk = next(self.chunks, None)
            return None if chunk is None else {"image": (source.train_pixels(chunk).float() / 255).numpy()}

    return Reader()


def cpu_flags() -> set[str]:
    """The CPU's feature words (/proc/cpuinfo's `flags`; empty where there is none)."""
    try:
        return set(next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")), []))
    except OSError:
        return set()


def reduce_range_for(cfg) -> bool:
    """`quantize.reduce_range`; auto: on where the CPU has no VNNI (AVX-512 VNNI or AVX-VNNI), whose u8 x s8 dot
    products are exact; without it onnxruntime's AVX2 kernels add pairs of products in int16, which can saturate."""
    if cfg.reduce_range != "auto":
        return cfg.reduce_range
    return not ({"avx512_vnni", "avx_vnni"} & cpu_flags())


def settings_of(cfg, reduce_range: bool) -> dict:
    import onnxruntime

    return {"format": "QDQ", "activations": "uint8", "weights": "int8", "per_channel": cfg.per_channel,
            "reduce_range": reduce_range, "calibration_method": cfg.calibration_method,
            "calibration_images": cfg.calibration_images, "seed": cfg.seed, "max_drop": cfg.max_drop,
            "onnxruntime": onnxruntime.__version__}


GUARD_IMAGES = 512  # held-out training images (not calibrated on) the accuracy guard measures the drop on


def guarded(quantize_with, fp32_top1: float, top1_of, candidates: list[str], max_drop: float):
    """The accuracy guard: quantize (`quantize_with(excluded) -> path`), and while the INT8 model's Top-1
    (`top1_of(path)`) is more than `max_drop` points below the fp32 one's, keep more layers in fp32: each
    candidate's sensitivity is the Top-1 with it alone excluded, and the layers are excluded in that order (the
    most accuracy restored first) until the drop holds. Returns (path, excluded layers, drop), or raises."""
    path = quantize_with([])
    drop = fp32_top1 - top1_of(path)
    if drop <= max_drop:
        return path, [], drop
    sensitivity = {c: top1_of(quantize_with([c])) for c in candidates}
    excluded = []
    for c in sorted(candidates, key=lambda c: -sensitivity[c]):  # stable: the graph's order breaks ties
        excluded.append(c)
        path = quantize_with(excluded)
        drop = fp32_top1 - top1_of(path)
        if drop <= max_drop:
            return path, excluded, drop
    raise QuantizeError(f"INT8 loses {drop:.2f} points of Top-1 on the held-out images even with every layer in "
                        f"fp32 (quantize.max_drop {max_drop})")


def quantize(fp32: Path, out: Path, metrics_path: Path, data_dir: Path, cfg, reference: Path | None = None,
             extra: dict | None = None) -> dict:
    """Quantize `fp32` into `out`, test it and the fp32 file `reference` (default: `fp32`; the guard measures the
    drop from it too) on the whole test set, write `metrics_path` (with `extra`); return the metrics."""
    _need_ort()
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not fp32.is_file():
        raise QuantizeError(f"{fp32}: no exported model (run `kdpipe export {fp32.stem}` first)")
    source = open_source(data_dir, Numerics(torch.device("cpu"), bf16=False, channels_last=False), workers=0)
    proto = load_export(fp32, data_dir, source.manifest.image_size)
    if any(p.key == "kdpipe.quantization" for p in proto.metadata_props):
        raise QuantizeError(f"{fp32}: already an INT8 model (quantize the fp32 export: "
                            f"`kdpipe quantize {fp32.name.removesuffix('.onnx').removesuffix('.int8')}`)")
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    if len(out_dims) == 2 and out_dims[1].dim_value and out_dims[1].dim_value != source.num_classes:
        raise QuantizeError(f"{fp32}: {out_dims[1].dim_value} classes, but {data_dir} has {source.num_classes}")
    idx = calibration_indices(source.train_size, cfg.calibration_images, cfg.seed)
    if not idx:
        raise QuantizeError(f"{data_dir}: no training images to calibrate the INT8 ranges on")
    # the guard's images: training images the ranges were not calibrated on (the calibration ones where none is
    # left), never the test set, which then measures the result
    perm = torch.randperm(source.train_size, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    held_out = sorted(perm[len(idx):len(idx) + GUARD_IMAGES]) or idx
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration_method]
    reduce_range = reduce_range_for(cfg)
    settings = settings_of(cfg, reduce_range)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory(prefix="kdpipe-quantize-") as work:
            pre = Path(work) / "pre.onnx"
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=False)

            def quantize_with(excluded: list[str]) -> Path:
                q_path = Path(work) / f"q{len(excluded)}-{abs(hash(tuple(excluded)))}.onnx"
                quantize_static(str(pre), str(q_path), _reader(source, idx), quant_format=QuantFormat.QDQ,
                                per_channel=cfg.per_channel, reduce_range=reduce_range,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                                nodes_to_exclude=list(excluded))
                return q_path

            def top1_of(path: Path) -> float:
                return top_k(session(path, cfg.threads), held_out_batches(source, held_out))["top1"]

            candidates = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type in CANDIDATE_OPS]
            fp32_top1 = top1_of(pre if reference is None else reference)
            q_path, excluded, guard_drop = guarded(quantize_with, fp32_top1, top1_of, candidates, cfg.max_drop)
            q = onnx.load(str(q_path))
        del q.metadata_props[:]
        for p in proto.metadata_props:
            q.metadata_props.add(key=p.key, value=p.value)
        q.metadata_props.add(key="kdpipe.quantization", value=json.dumps(settings))
        onnx.save(q, str(tmp))
        fp = top_k(session(reference or fp32, cfg.threads), source.test_pixels(EVAL_BATCH))
        i8 = top_k(session(tmp, cfg.threads), source.test_pixels(EVAL_BATCH))
        metrics = {"top1": round(i8["top1"], 2), "top5": round(i8["top5"], 2), "fp32_top1": round(fp["top1"], 2),
                   "fp32_top5": round(fp["top5"], 2), "top1_drop": round(fp["top1"] - i8["top1"], 2),
                   "calibration_images": len(idx), "reduce_range": reduce_range,
                   # the guard: the drop on held-out training images, and the layers it kept in fp32 to hold it
                   "guard": {"max_drop": cfg.max_drop, "held_out_images": len(held_out),
                             "top1_drop_held_out": round(guard_drop, 2), "fp32_layers": excluded}, **(extra or {})}
        if i8["classes"] <= 5:  # Top-5 of 5 classes or fewer is always 100 %
            for k in ("top5", "fp32_top5"):
                del metrics[k]
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        atomic_write(metrics_path, json.dumps(metrics, indent=2) + "\n")
    except BaseException:
        out.unlink(missing_ok=True)  # never an INT8 model without its metrics
        raise
    return metrics
