"""`kdpipe qat`: quantization-aware fine-tuning against the teacher, in onnxruntime's INT8 scheme, shipped as the
QDQ file onnxruntime runs; checked against onnxruntime itself (its quantizer's weights and ranges, its
QuantizeLinear), on a tiny synthetic run at 32 px."""

import copy
import json
import os
import shutil

import numpy as np
import onnx  # the `export` extra, part of the test install: a broken install fails here, never skips
import onnxruntime as ort
import pytest
import torch
import yaml
from onnx import helper, numpy_helper

from kdpipe import checkpoint, config, models, qat, quantize, sources
from kdpipe.export import Normalized, save_checked
from kdpipe.runtime import Numerics

from .conftest import built_project, invoke, project_copy, tiny_params

FAST = {"quantize": {"calibration_images": 50, "seed": 0, "max_drop": 100.0}, "qat": {"epochs": 1},
        "measure": {"warmup": 1, "runs": 5, "rounds": 2, "batch_size": 8}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A teacher, a KD student, evaluated and exported (built once for the module)."""
    return built_project(tmp_path_factory.mktemp("qat"), tiny_params(**FAST),
                         [("data",), ("teacher",), ("distill", "-m", "kd"), ("evaluate", "kd"), ("export", "kd")])


@pytest.fixture
def project(built, tmp_path, monkeypatch):
    return project_copy(built, tmp_path, monkeypatch)


def test_fake_quantize_is_onnxruntimes_quantize_dequantize():
    """Values on and between the grid's points, halves (rounded to even) and beyond the range, through a
    QuantizeLinear -> DequantizeLinear graph and through `fake_quantize`: the same floats; the gradient 1."""
    scale, zp = np.float32(0.05), 7
    x = np.concatenate([np.arange(-60, 260, dtype=np.float32) * scale * 0.5 - zp * scale,
                        np.random.default_rng(0).normal(0, 5, 1000).astype(np.float32)]).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [len(x)])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [len(x)])],
        [numpy_helper.from_array(np.array(scale), "s"), numpy_helper.from_array(np.array(zp, dtype=np.uint8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    t = torch.from_numpy(x).requires_grad_()
    got = qat.fake_quantize(t, torch.tensor(scale), torch.tensor(float(zp)), 0, 255)
    assert np.array_equal(got.detach().numpy(), expected)
    got.sum().backward()
    assert torch.equal(t.grad, torch.ones_like(t))


def test_a_simulated_layer_computes_with_its_quantized_input_and_weight():
    """A convolution and ReLU under `simulate_int8`, calibrated on one batch and run on another, against numpy: its
    weight rounded per output channel to max|w| / 127 steps, its input to (max - min) / 255 steps about the zero
    point and saturated to [0, 255]; its output, which a ReLU reads, left to the next layer (onnxruntime folds the
    ReLU into that range)."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    w, b = layer[0].weight.detach().numpy().copy(), layer[0].bias.detach().numpy()
    qat.simulate_int8(layer, False, True, 8)
    assert not hasattr(layer[0], "output_quant")
    calib, x = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8) * 1.5  # beyond the calibrated range: saturates
    qat.calibrate(layer, [calib])
    got = layer(x)
    s_w = (np.abs(w).reshape(4, -1).max(1) * 2 / 254).astype(np.float32).reshape(4, 1, 1, 1)
    w_q = np.round(w / s_w) * s_w
    x_q = quantized(x.numpy(), calib.min().item(), calib.max().item())
    expected = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x_q), torch.from_numpy(w_q), torch.from_numpy(b)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    float_out = torch.relu(torch.nn.functional.conv2d(x, torch.from_numpy(w), torch.from_numpy(b)))
    assert not torch.allclose(got, float_out, atol=1e-3)


def quantized(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """v through uint8 with the calibrated range [lo, hi] (widened to hold 0), in numpy."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255)
    zp = np.round(-lo / scale)
    return ((np.clip(np.round(v / scale) + zp, 0, 255) - zp) * scale).astype(np.float32)


def test_an_output_no_relu_reads_is_quantized_too():
    """A convolution followed by an addition (a residual branch) and a linear layer (the classifier): their
    outputs are quantized with their own calibrated ranges, as onnxruntime quantizes them."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu_conv, self.fc = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1), torch.nn.Linear(3, 2)

        def forward(self, x):
            y = torch.nn.functional.relu(self.relu_conv(x))
            return self.fc((self.conv(x) + y).mean((2, 3)))

    net = Net()
    qat.simulate_int8(net, False, True, 4)
    assert [hasattr(m, "output_quant") for m in (net.conv, net.relu_conv, net.fc)] == [True, False, True]
    calib = torch.randn(4, 3, 4, 4)
    qat.calibrate(net, [calib])
    with torch.no_grad():
        raw = net.conv.weight  # the simulated (quantized) weight
        inner = torch.nn.functional.conv2d(torch.from_numpy(quantized(calib.numpy(), calib.min().item(),
                                                                      calib.max().item())), raw, net.conv.bias)
    lo, hi = net.conv.output_quant.lo.item(), net.conv.output_quant.hi.item()
    out = {}
    net.conv.register_forward_hook(lambda m, a, o: out.setdefault("conv", o))
    with torch.no_grad():
        net(calib)
    torch.testing.assert_close(out["conv"], torch.from_numpy(quantized(inner.numpy(), lo, hi)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_2", "vgg8", "mobilenetv2", "shufflev1", "tv/mobilenet_v3_small",
                                  "tv/resnet18"])
def test_batch_norms_fold_into_the_convolutions_before_them(name):
    torch.manual_seed(0)
    model = models.create(name, 10).eval()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:  # statistics and affine parameters far from the identity
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        folded = qat.fold_batch_norms(model, 32)
        after = model(x)
    # each BN that reads a convolution is folded into it (all of them but WRN's pre-activation ones, frozen)
    assert folded == len(bns) - 6 * (name == "wrn_16_2") > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def weights_and_ranges(proto):
    """Of each Conv/Gemm/MatMul of an onnxruntime QDQ file: (its dequantized weight, its input's (scale, zero
    point), its output's), computed from the file's integers with numpy."""
    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    made = {o: n for n in proto.graph.node for o in n.output}
    read = {i: n for n in proto.graph.node for i in n.input}
    out = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        x_dq, w_dq = made[node.input[0]], made[node.input[1]]
        assert x_dq.op_type == w_dq.op_type == "DequantizeLinear"
        q, s, z = (init[n] for n in w_dq.input)
        axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
        shape = [-1 if d == axis else 1 for d in range(q.ndim)]
        w = (q.astype(np.float32) - z.astype(np.float32).reshape(shape)) * s.reshape(shape)
        y_q = read[node.output[0]]
        assert y_q.op_type == "QuantizeLinear"
        out.append((w if node.op_type == "Conv" else w.reshape(q.shape).T if node.op_type == "MatMul" else w,
                    *((init[n.input[1]].item(), int(init[n.input[2]].item())) for n in (x_dq, y_q))))
    return out


@pytest.mark.parametrize("reduce_range, per_channel", [(False, True), (True, True), (False, False)])
def test_simulated_int8_is_what_onnxruntime_quantizes(built, tmp_path, reduce_range, per_channel):
    """A distilled student folded and fake-quantised, calibrated on the calibration images: each layer's weight
    equals the one onnxruntime's quantizer writes for the folded model's export (per channel, to the bit), and
    each layer's input scale and zero point the ones its MinMax calibration gives (the scale to the rounding of
    torch's and onnxruntime's float convolutions)."""
    p = config.validate(tiny_params(**FAST))
    cfg = p.quantize.model_copy(update={"reduce_range": reduce_range, "per_channel": per_channel})
    source = sources.open_source(built / "data/prepared", Numerics(torch.device("cpu"), False, False), 0)
    ckpt = checkpoint.load_checkpoint(built / "models/kd.pt")
    model = checkpoint.restore_model(ckpt).eval()
    qat.fold_batch_norms(model, 32)
    plain = copy.deepcopy(model)
    qat.simulate_int8(model, reduce_range, per_channel, 32)
    norm = source.manifest.normalization
    mean, std = (torch.tensor(norm[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    idx = quantize.calibration_indices(source.train_size, cfg.calibration_images, cfg.seed)
    qat.calibrate(model, [(source.train_pixels(idx[i:i + 7]).float() / 255 - mean) / std for i in range(0, len(idx), 7)])
    x = next(iter(source.test_pixels(16)))[0].float() / 255
    save_checked(Normalized(plain, norm["mean"], norm["std"]).eval(), tmp_path / "f.onnx", x, "onnx", None, {}, 32)
    quantize.quantize(tmp_path / "f.onnx", tmp_path / "q.onnx", tmp_path / "q.json", built / "data/prepared", cfg)
    written = weights_and_ranges(onnx.load(str(tmp_path / "q.onnx")))
    layers = [m for m in model.modules() if isinstance(m, qat.QUANTIZED)]
    assert len(written) == len(layers) == 10  # resnet8: 9 convolutions (2 of them shortcuts), the classifier
    for w, x_q, y_q in written:
        m = next(m for m in layers if tuple(m.weight.shape) == w.shape and np.array_equal(m.weight.detach().numpy(), w))
        # the ranges of two runtimes' float convolutions: equal to their rounding
        for quant, (scale, zero_point) in ((m.input_quant, x_q), (getattr(m, "output_quant", None), y_q)):
            if quant is None:  # a ReLU follows: onnxruntime folded it, the output's range starts at 0
                assert zero_point == 0
                continue
            mine = qat.activation_qparams(quant.lo.item(), quant.hi.item())
            assert mine[0] == pytest.approx(scale, rel=1e-5) and mine[1] == zero_point
        layers.remove(m)
    assert not layers
    # each block's second convolution, the two shortcuts and the classifier: no ReLU reads them
    assert sum(hasattr(m, "output_quant") for m in model.modules()) == 6
    # the simulated model's logits nearer onnxruntime's INT8 ones than the float model's are
    x = next(iter(source.test_pixels(1000)))[0].float() / 255
    with torch.no_grad():
        sim, fp = model((x - mean) / std), plain((x - mean) / std)
    int8 = torch.from_numpy(ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"image": x.numpy()})[0])
    assert (sim - int8).abs().mean() < 0.75 * (fp - int8).abs().mean()


def test_qat_ships_an_int8_file_with_true_metrics_and_the_same_bits_twice(project, tmp_path):
    """`kdpipe qat kd`: models/kd.qat.onnx in QDQ form with kdpipe's contract and both settings in its metadata;
    its Top-1/Top-5 and the fp32 file's, recomputed here with onnxruntime on the whole test set; the fine-tuning's
    log; no checkpoint or resume file left; a second run in a copy writes the same bytes."""
    twin = tmp_path / "twin"
    shutil.copytree(project, twin)
    out = invoke("qat", "kd")
    assert "kd -> models/kd.qat.onnx: top1" in out
    proto = onnx.load("models/kd.qat.onnx")
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["kdpipe.qat"])["epochs"] == 1 and "kdpipe.quantization" in meta
    assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) >= 20  # every layer's weight and input
    m = json.loads(open("metrics/kd.qat.json").read())
    source = sources.open_source(project / "data/prepared", Numerics(torch.device("cpu"), False, False), 0)
    x = np.concatenate([b[0].numpy() for b in source.test_pixels(1000)])
    y = np.concatenate([b[1].numpy() for b in source.test_pixels(1000)])
    for path, key in (("models/kd.qat.onnx", "top1"), ("models/kd.onnx", "fp32_top1")):
        logits = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
            ["logits"], {"image": x.astype(np.float32) / 255})[0]
        assert m[key] == round((logits.argmax(1) == y).mean() * 100, 2), path
    assert m["top1_drop"] == round(m["fp32_top1"] - m["top1"], 2) and m["qat"]["folded_batch_norms"] == 9
    log = json.loads(open("logs/kd.qat.json").read())
    assert log["role"] == "qat" and log["student"] == "kd" and len(log["loss_terms"]) == 1
    assert not list(project.glob("models/*.pt.resume")) and not (project / "models/kd.qat.pt").exists()
    os.chdir(twin)
    invoke("qat", "kd")
    for f in ("models/kd.qat.onnx", "metrics/kd.qat.json", "logs/kd.qat.json"):
        assert (twin / f).read_bytes() == (project / f).read_bytes(), f


def test_the_fine_tuning_trains_through_the_simulated_int8(project, monkeypatch):
    """The fine-tuning's model computes with the fake-quantised weights and inputs (its logits are not the float
    model's), and its gradients reach the float weights through the rounding."""
    seen = {}
    original = qat.strip

    def record(handles):
        seen["grad"] = all(p.grad is not None and p.grad.abs().sum() > 0 for m, _ in handles
                           for p in m.parametrizations.weight.parameters())
        seen["layers"] = len(handles)
        original(handles)

    monkeypatch.setattr(qat, "strip", record)
    invoke("qat", "kd")
    assert seen == {"grad": True, "layers": 10}


def test_qat_errors_are_one_line_and_write_nothing(project):
    (project / "models/kd.onnx").rename(project / "models/kd.onnx.away")
    out = invoke("qat", "kd", code=1)
    assert "models/kd.onnx: no exported model to compare with (run `kdpipe export kd` first)" in out
    (project / "models/kd.onnx.away").rename(project / "models/kd.onnx")
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["quantize"]["calibration_method"] = "entropy"
    (project / "params.yaml").write_text(yaml.safe_dump(p))
    out = invoke("qat", "kd", code=1)
    assert "quantize.calibration_method is entropy (set it to minmax)" in out
    p["quantize"]["calibration_method"], p["qat"] = "minmax", {"epochs": 0}
    (project / "params.yaml").write_text(yaml.safe_dump(p))
    assert "qat.epochs" in invoke("qat", "kd", code=2)
    p["qat"] = {"epochs": 1}
    (project / "params.yaml").write_text(yaml.safe_dump(p))
    assert "models/nope.onnx: no exported model" in invoke("qat", "nope", code=1)
    assert not [f for d in ("models", "metrics", "logs") for f in (project / d).glob("*qat*")]


def test_measure_and_report_take_the_qat_file_beside_the_ptq_one(project):
    invoke("quantize", "kd")
    invoke("qat", "kd")
    invoke("measure", "kd", "kd.int8", "kd.qat")
    measured = json.loads(open("metrics/measure.json").read())
    assert measured["kd.qat"]["precision"] == "int8" and "speedup_vs_fp32" in measured["kd.qat"]
    assert measured["kd.qat"]["top1"] == json.loads(open("metrics/kd.qat.json").read())["top1"]
    invoke("report", "kd", "--out", "reports")
    text = open("reports/results.md").read()
    assert "| kd.int8 (PTQ) |" in text and "| kd.qat (QAT, 1 epochs) |" in text and "| kd.qat | int8 |" in text
