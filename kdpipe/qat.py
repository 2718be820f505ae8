"""`kdpipe qat NAME`: distillation-aware quantization-aware training of a distilled student, shipped as INT8.

The student (models/NAME.pt) is fine-tuned for `qat.epochs` epochs at `qat.lr` (constant) against the teacher
(models/teacher.pt) with KD's loss and `distill.kd`'s settings, the student's recipe otherwise (batch, seed,
augmentation, weight decay), while its forward simulates the INT8 model onnxruntime will run, in onnxruntime's own
QDQ scheme and formulas (`onnxruntime.quantization.quant_utils.compute_scale_zp`):
- BatchNorm folded into the convolution before it, as the export folds it (the fine-tuning then trains the folded
  weights; Dropout still trains);
- each convolution's and linear layer's weight fake-quantised per output channel (per tensor where
  `quantize.per_channel` is false), symmetric int8 (scale max|w| / 127, zero point 0; with `reduce_range`, / 64);
- each convolution's and linear layer's input, and its output where no ReLU follows (onnxruntime folds a ReLU
  into the quantized output's range, which is then the next layer's input), fake-quantised per tensor,
  asymmetric uint8 (the range widened to hold 0, scale (max - min) / 255, zero point round(-min / scale)), its
  min and max calibrated as onnxruntime's MinMax calibration takes them: over the `quantize` section's
  calibration images, evaluation view, the float model, before the fine-tuning (held fixed while it trains).
  Not simulated: the residual additions' and other element-wise outputs onnxruntime also quantizes.
Gradients pass the rounding straight through. Then the fine-tuned (folded, float) model is exported and quantized
exactly as `kdpipe quantize` quantizes an export (onnxruntime's `quantize_static`, QDQ, the same calibration
images and accuracy guard, its MinMax ranges taken again on the fine-tuned weights): models/NAME.qat.onnx, an INT8
file onnxruntime runs at INT8 speed, and metrics/NAME.qat.json (Top-1/Top-5 on the whole test set beside the
student's fp32 ONNX file, models/NAME.onnx). The fine-tuning's log: logs/NAME.qat.json (each epoch's test
accuracy is the fake-quantised model's).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import checkpoint as ckpt_io
from . import config, engine, runtime, sources
from .config import Error
from .data import file_sha256


class QatError(Error):
    pass


# onnxruntime's integer ranges (quant_utils' ONNX_INT_TYPE_RANGE, _SYMMETRIC_RANGE and _REDUCED_RANGE): uint8
# activations, and symmetric int8 weights, 7-bit with `reduce_range` (which only the weights take)
ACTIVATION_RANGE = (0, 255)
WEIGHT_RANGE = {False: (-127, 127), True: (-64, 64)}


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
    """Quantize and dequantize as onnxruntime's QuantizeLinear/DequantizeLinear do (x / scale, rounded half to
    even, plus the zero point, saturated), with the rounding's gradient passed straight through."""
    with torch.no_grad():
        q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
        dequantized = (q - zero_point) * scale
    return dequantized + (x - x.detach())  # its value exactly the dequantized one, its gradient 1


def weight_scale(w: torch.Tensor, reduce_range: bool, per_channel: bool = True) -> torch.Tensor:
    """Per output channel (dim 0; else one for the tensor): max|w| / qmax in float64, stored as float32 (1 where it
    underflows)."""
    qmin, qmax = WEIGHT_RANGE[reduce_range]
    absmax = w.detach().abs().flatten(1).amax(1).double()
    if not per_channel:
        absmax = absmax.amax().expand_as(absmax)
    scale = (2 * absmax / (qmax - qmin)).float()
    return torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)


def activation_qparams(lo: float, hi: float) -> tuple[float, float]:
    """(scale, zero point) of a uint8 tensor whose calibrated range is [lo, hi]: onnxruntime's compute_scale_zp."""
    qmin, qmax = ACTIVATION_RANGE
    lo, hi = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
    scale = (np.float64(hi) - np.float64(lo)) / (qmax - qmin)
    if scale < np.finfo(np.float32).tiny:
        return 1.0, 0.0
    return float(np.float32(scale)), float(np.round(qmin - lo / scale))


class WeightQuant(nn.Module):
    """A parametrization: the weight as INT8 stores it (symmetric, per output channel or per tensor)."""

    def __init__(self, reduce_range: bool, per_channel: bool = True):
        super().__init__()
        self.reduce_range, self.per_channel, self.calibrating = reduce_range, per_channel, False

    def forward(self, w):
        if self.calibrating:  # the float weights, as the calibration of the exported (float) model sees them
            return w
        scale = weight_scale(w, self.reduce_range, self.per_channel).view(-1, *[1] * (w.dim() - 1))
        return fake_quantize(w, scale, torch.zeros_like(scale), *WEIGHT_RANGE[self.reduce_range])


class ActivationQuant(nn.Module):
    """A layer's input or output as INT8 stores it (per tensor, asymmetric uint8); while `calibrating`, records its
    range, and `fix` sets its scale and zero point from it (buffers: a resumed run keeps them)."""

    def __init__(self):
        super().__init__()
        self.calibrating = False
        for name, value in (("lo", float("inf")), ("hi", float("-inf")), ("scale", 1.0), ("zero_point", 0.0)):
            self.register_buffer(name, torch.tensor(value))

    def fix(self) -> None:
        scale, zero_point = activation_qparams(self.lo.item(), self.hi.item())
        self.scale.fill_(scale), self.zero_point.fill_(zero_point)

    def forward(self, x):
        if self.calibrating:
            self.lo = torch.minimum(self.lo, x.detach().min().float())
            self.hi = torch.maximum(self.hi, x.detach().max().float())
            return x
        return fake_quantize(x, self.scale, self.zero_point, *ACTIVATION_RANGE)


QUANTIZED = (nn.Conv2d, nn.Linear)  # the layers onnxruntime runs in INT8 (Conv, and Gemm/MatMul)


@contextlib.contextmanager
def outputs_of(layers: list[nn.Module]):
    """While the block runs: `made_by(x)`, the layer of `layers` whose output tensor `x` is (None: none's)."""
    made = {}
    hooks = [m.register_forward_hook(lambda mod, args, out: made.__setitem__(id(out), (mod, out))) for m in layers]
    try:
        yield lambda x: made[id(x)][0] if id(x) in made and made[id(x)][1] is x else None
    finally:
        for h in hooks:
            h.remove()


def probe(model: nn.Module, image_size: int) -> None:
    """One forward of a blank image in eval mode: what the structural lookups below watch."""
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))


def fold_batch_norms(model: nn.Module, image_size: int) -> int:
    """Fold each BatchNorm2d that reads a convolution's output into that convolution (eval statistics), in place,
    leaving an Identity: the model the export's graph computes. The pairs are found by one forward (the BN's input
    is the convolution's output tensor). A BN that reads anything else (a pre-activation network's) is frozen at
    its statistics (torchvision's FrozenBatchNorm2d), as the export runs it. Returns how many were folded."""
    from torchvision.ops import FrozenBatchNorm2d

    pairs = {}  # id(bn) -> (conv, bn)
    with outputs_of([m for m in model.modules() if isinstance(m, nn.Conv2d)]) as made_by:
        def pair(bn, args):
            if made_by(args[0]) is not None:
                pairs[id(bn)] = (made_by(args[0]), bn)

        hooks = [m.register_forward_pre_hook(pair) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        probe(model, image_size)
    for h in hooks:
        h.remove()
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    for conv, bn in pairs.values():
        with torch.no_grad():
            factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(factor.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * factor)
        parent, name = parents[id(bn)]
        setattr(parent, name, nn.Identity())
    for bn in [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]:
        frozen = FrozenBatchNorm2d(bn.num_features, bn.eps)
        frozen.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
        parent, name = parents[id(bn)]
        setattr(parent, name, frozen)
    return len(pairs)


# what onnxruntime's QDQ quantizer folds into the range of the quantized output before it (a removable activation)
RELUS = (torch.relu, torch.relu_, F.relu, F.relu6, torch.Tensor.relu, torch.Tensor.relu_)


def followed_by_relu(model: nn.Module, layers: list[nn.Module], image_size: int) -> set[int]:
    """The ids of `layers` whose output goes straight into a ReLU (a module's or a function's: seen by one
    forward under a torch function mode)."""
    from torch.overrides import TorchFunctionMode

    fed = set()
    with outputs_of(layers) as made_by:
        class Watch(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in RELUS and args and made_by(args[0]) is not None:
                    fed.add(id(made_by(args[0])))
                return func(*args, **(kwargs or {}))

        with Watch():
            probe(model, image_size)
    return fed


def simulate_int8(model: nn.Module, reduce_range: bool, per_channel: bool, image_size: int) -> list:
    """Fake-quantise every Conv2d/Linear of `model` in place as onnxruntime's QDQ graph quantizes it: its weight,
    its input, and its output where no ReLU follows (a ReLU's output is the next layer's quantized input: onnxruntime
    removes the ReLU and quantizes with its range). Returns what `strip` undoes."""
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED)]
    relu_after = followed_by_relu(model, layers, image_size)
    handles = []
    for m in layers:
        parametrize.register_parametrization(m, "weight", WeightQuant(reduce_range, per_channel))
        m.input_quant = ActivationQuant()
        hooks = [m.register_forward_pre_hook(lambda mod, args: (mod.input_quant(args[0]), *args[1:]))]
        if id(m) not in relu_after:
            m.output_quant = ActivationQuant()
            hooks.append(m.register_forward_hook(lambda mod, args, out: mod.output_quant(out)))
        handles.append((m, hooks))
    return handles


def strip(handles: list) -> None:
    """The plain float model again: the trained weights kept, the fake quantisation removed."""
    for m, hooks in handles:
        for h in hooks:
            h.remove()
        del m.input_quant
        if hasattr(m, "output_quant"):
            del m.output_quant
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)


def calibrate(model: nn.Module, batches) -> None:
    """Each layer's input range over the (normalised) calibration batches, run as onnxruntime's calibration runs
    the float model: in eval mode, nothing quantized."""
    quants = [m for m in model.modules() if isinstance(m, (ActivationQuant, WeightQuant))]
    for q in quants:
        q.calibrating = True
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)
    for q in quants:
        q.calibrating = False
        if isinstance(q, ActivationQuant):
            q.fix()


def recipe(params: config.Params) -> config.Train:
    """The fine-tuning's recipe: the student's (batch, seed, augmentation, weight decay, runtime) for `qat.epochs`
    epochs at the constant `qat.lr`."""
    s = params.student
    optim = s.optim.model_copy(update={"lr": params.qat.lr, "lr_by_model": {}, "lr_batch": None})
    return s.model_copy(update={"epochs": params.qat.epochs, "optim": optim,
                                "schedule": config.Schedule(milestones=[], warmup_epochs=0)})


def qat(name: str, params: config.Params, teacher: Path, data_dir: Path) -> dict:
    """Fine-tune models/NAME.pt under simulated INT8 against `teacher`, export and quantize it:
    models/NAME.qat.onnx and metrics/NAME.qat.json (returned)."""
    from . import quantize as q
    from .distill import Distiller, TrainData, feature_shapes
    from .export import Normalized, export_metadata, save_checked
    from .runs import load_teacher

    q._need_ort()
    if params.quantize.calibration_method != "minmax":
        raise QatError(f"qat simulates onnxruntime's MinMax ranges, but quantize.calibration_method is "
                       f"{params.quantize.calibration_method} (set it to minmax)")
    student_path, reference = ckpt_io.model_path(name), q.onnx_path(name)
    out, metrics_path = q.onnx_path(f"{name}.qat"), Path(f"metrics/{name}.qat.json")
    if not reference.is_file():
        raise QatError(f"{reference}: no exported model to compare with (run `kdpipe export {name}` first)")
    cfg = recipe(params)
    ctx = runtime.context(cfg.runtime)
    numerics = ctx.numerics
    source = sources.open_source(data_dir, numerics, cfg.runtime.workers)
    manifest, size = source.manifest, source.manifest.image_size
    ckpt = ckpt_io.load_checkpoint(student_path, cfg.model, source.num_classes)
    if ckpt["data_sha256"] != manifest.sha256:
        raise ckpt_io.CheckpointError(f"{student_path}: the student was trained on other data than {data_dir}")
    _, teacher_model, teacher_input, teacher_sha256 = load_teacher(teacher, source, data_dir, numerics)
    reduce_range = q.reduce_range_for(params.quantize)
    torch.manual_seed(cfg.seed)
    model = ckpt_io.restore_model(ckpt)
    folded = fold_batch_norms(model, size)
    s_shapes = feature_shapes(model, image_size=size)
    handles = simulate_int8(model, reduce_range, params.quantize.per_channel, size)
    idx = q.calibration_indices(source.train_size, params.quantize.calibration_images, params.quantize.seed)
    norm = ckpt.get("normalization") or manifest.normalization
    mean, std = (torch.tensor(norm[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    calibrate(model, ((source.train_pixels(idx[i:i + q.CALIBRATION_BATCH]).cpu().float() / 255 - mean) / std
                      for i in range(0, len(idx), q.CALIBRATION_BATCH)))  # the model is still on the CPU
    objective = Distiller(teacher_model, ["kd"], params.distill, s_shapes,
                          feature_shapes(teacher_model, numerics.device, size), TrainData(source.train_labels),
                          teacher_input)
    settings = {"epochs": cfg.epochs, "lr": cfg.optim.lr, "reduce_range": reduce_range,
                "per_channel": params.quantize.per_channel, "folded_batch_norms": folded,
                "calibration_images": len(idx), "kd": params.distill.kd.model_dump()}
    meta = {"role": "qat", "student": name, "student_sha256": file_sha256(student_path),
            "teacher_sha256": teacher_sha256, "qat": settings}
    run_name = f"{name}.qat"
    try:
        engine.train(engine.Run(name=run_name, model=model, cfg=cfg, out=ckpt_io.model_path(run_name),
                                log=ckpt_io.log_path(run_name), objective=objective, meta=meta), source, ctx)
    finally:
        ckpt_io.model_path(run_name).unlink(missing_ok=True)  # the fine-tuned weights ship as the INT8 file
    strip(handles)
    module = Normalized(model.cpu().eval(), norm["mean"], norm["std"]).eval()
    x = next(iter(source.test_pixels(256)))[0].cpu().float() / 255
    metadata = {**export_metadata(ckpt, student_path, manifest.classes, norm, size), "kdpipe.qat": json.dumps(settings)}
    with tempfile.TemporaryDirectory(prefix="kdpipe-qat-") as work:
        fp32 = Path(work) / f"{name}.qat.fp32.onnx"
        save_checked(module, fp32, x, "onnx", None, metadata, size)
        return q.quantize(fp32, out, metrics_path, data_dir, params.quantize, reference=reference,
                          extra={"qat": settings})
