"""fp32 losses under bf16 autocast: every loss computes in fp32 whatever autocast
region it is called from, and the per-epoch test evaluation never runs in bf16."""

import importlib
import inspect
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kdpipe import config, data, engine, models
from kdpipe.prepare import prepare
from kdpipe.runtime import Numerics
from kdpipe.sources import MemorySource
from kdpipe.distill import Distiller, feature_shapes
from kdpipe.distill import functional as Fd
from kdpipe.distill import nst

from .conftest import tiny_params

# the shared losses and each method's own, at the top of its file
MODULES = [Fd] + [importlib.import_module(f"kdpipe.distill.{m}") for m in config.METHODS]
# their public functions that are not losses (WKD's CKA cost: computed once, in exact fp32, by `kdpipe wkd-cost`)
HELPERS = {"match_spatial", "ofd_margin", "cosine_lambda", "cosine_decay", "check_channels", "lrelu", "encoder", "connector",
           "linear_cka", "cka_cost", "class_features", "cost_file", "write_cost"}


def near_equal(shape, seed=0):
    """A teacher feature map and a student one within ~5 % of it (what training converges to)."""
    g = torch.Generator().manual_seed(seed)
    ft = torch.relu(torch.randn(shape, generator=g))
    return ft * (1 + 0.05 * torch.randn(shape, generator=g)), ft


def cases():
    fs, ft = near_equal((8, 16, 8, 8))
    taps = [near_equal((8, c, h, h), seed=i) for i, (c, h) in enumerate([(16, 32), (16, 32), (32, 16), (64, 8)])]
    s_logits, t_logits = near_equal((8, 100), seed=7)
    g = torch.Generator().manual_seed(11)
    pre_t = [torch.randn(8, c, h, h, generator=g) for c, h in [(16, 32), (32, 16), (64, 8)]]  # pre-ReLU taps (AB)
    pre_s = [t + 0.3 * torch.randn(t.shape, generator=g) for t in pre_t]
    return {
        "ab": (pre_s, pre_t),
        "factor": (fs,),
        "ft": (fs, ft),
        "cross_entropy": (s_logits, torch.arange(8)),
        "kd": (s_logits, t_logits, 4.0),
        "attention_map": (fs,),
        "attention": (fs, ft),
        "nst": (fs, ft),
        "fsp_matrix": (fs, ft),
        "fsp": ([s for s, _ in taps], [t for _, t in taps]),
        "hint": (fs, ft),
        "sp": (fs, ft),
        "pkt": (fs.mean((2, 3)), ft.mean((2, 3))),
        "rkd": (fs.mean((2, 3)), ft.mean((2, 3))),
        "cc": (fs.mean((2, 3)), ft.mean((2, 3))),
        "dkd": (s_logits, t_logits, torch.arange(8)),
        "standardize": (s_logits,),
        "dist": (s_logits, t_logits, 1.0, 1.0, 4.0),
        "vid": (fs, ft, torch.zeros(16)),
        "nce": (torch.exp(near_equal((8, 17), seed=3)[0]), 1000),
        "hcl": ([s for s, _ in taps[1:]], [t for _, t in taps[1:]]),
        "kdsvd": ([s for s, _ in taps[1:]], [t for _, t in taps[1:]], 1),
        "ofd": (pre_s, pre_t, [torch.full((c,), -0.5) for c in (16, 32, 64)]),
        "mlkd": (s_logits, t_logits, 0.9 * s_logits, t_logits, 4.0),
        "wttm": (s_logits, t_logits, 0.2, True),
        "sdd": (torch.stack([s_logits, 0.9 * s_logits]), torch.stack([t_logits, t_logits.flip(1)]), torch.arange(8)),
        "rld": (s_logits, t_logits, torch.arange(8)),
        "wkd_logit": (s_logits, t_logits, torch.arange(8), 1 - torch.eye(100)),
        "wkd_feature": (fs, ft, 4.0, 2),
        "contrast_scores": (F.normalize(fs.mean((2, 3)), dim=1), F.normalize(ft.mean((2, 3)), dim=1),
                            torch.randint(0, 8, (8, 5), generator=torch.Generator().manual_seed(0)), 0.07),
    }


def public_functions() -> dict:
    own = {n: f for m in MODULES for n, f in vars(m).items()
           if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == m.__name__ and n not in HELPERS}
    return {**own, "cross_entropy": Fd.cross_entropy}  # the CE term (kdpipe/losses.py) is public in `functional` too


def test_every_loss_is_declared_fp32_and_tested_here():
    # a new loss without @fp32, or without a case below, fails here
    assert sorted(public_functions()) == sorted(cases())
    assert all(getattr(f, "fp32", False) for f in public_functions().values())


@pytest.mark.parametrize("name", sorted(cases()))
def test_loss_under_bf16_autocast_equals_fp32(name):
    fn, args = public_functions()[name], cases()[name]
    ref = fn(*args)
    bf16_args = [a.bfloat16() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    # the bf16 values, exactly, in fp32 (every bf16 number is an fp32 one): what the loss must compute from
    ref_from_bf16 = fn(*[a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in bf16_args])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(*args)
        from_bf16 = fn(*bf16_args)  # bf16 inputs (what autocast convs produce) are computed in fp32 too
    assert got.dtype == torch.float32 and from_bf16.dtype == torch.float32
    # bit-equal: autocast switched off, the loss runs the very fp32 operations on the very fp32 inputs; bf16 enters
    # only by rounding the inputs, and from there the computation is the fp32 one again
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(from_bf16, ref_from_bf16, rtol=0, atol=0)


def test_the_check_would_catch_bf16_matmuls():
    # without the decorator, NST of near-equal maps under autocast is far off (bmm in bf16): the tests above can fail
    fs, ft = near_equal((8, 16, 8, 8))
    ref = nst.nst(fs, ft).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        raw = nst.nst.__wrapped__(fs, ft).item()
    assert abs(raw - ref) > 0.1 * ref


@pytest.mark.parametrize("name", ["nst", "fsp_matrix", "hint"])
def test_gradients_under_autocast_match_fp32(name):
    fs, ft = near_equal((8, 16, 8, 8))

    def grad(autocast: bool):
        x = fs.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = public_functions()[name](x, ft)
        (out.sum() if out.dim() else out).backward()  # as in engine.train_step: backward outside autocast
        return x.grad

    # bit-equal: the forward runs in fp32 either way (autocast off inside the loss) and the backward outside autocast
    torch.testing.assert_close(grad(True), grad(False), rtol=0, atol=0)


@pytest.mark.parametrize("methods", [["kd"], ["at"], ["nst"], ["fsp"], ["fitnets"]])
def test_distiller_step_under_autocast_matches_fp32(methods):
    p = config.validate(tiny_params())
    torch.manual_seed(0)
    teacher, student = models.create("resnet14", 10), models.create("resnet8", 10)
    obj = Distiller(teacher, methods, p.distill, feature_shapes(student), feature_shapes(teacher))
    student.eval()  # BN in eval mode: both calls see the same statistics
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    ref, _, _ = obj(student, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _, _ = obj(student, x, y)
    assert got.dtype == torch.float32
    # not exact: here bf16 does enter, in the networks' convolutions under autocast (the losses then take their bf16
    # features in fp32): bounded by one bf16 rounding, 2^-8 relative (the errors of many values average out in the
    # loss; measured <= 8.4e-4 for these five)
    assert got.item() == pytest.approx(ref.item(), rel=2 ** -8, abs=0)


def test_test_evaluation_is_fp32_whatever_the_training_numerics(tmp_path):
    p = config.validate(tiny_params())
    prepare(p.data, tmp_path / "prepared")
    prepared = data.load(tmp_path / "prepared")
    torch.manual_seed(0)
    model = models.create("resnet8", 10)
    fp32 = engine.evaluate(model, MemorySource(prepared, Numerics(torch.device("cpu"), False, False)).test())
    bf16 = engine.evaluate(model, MemorySource(prepared, Numerics(torch.device("cpu"), True, False)).test())
    assert bf16 == fp32  # bit-equal: no autocast in the evaluation that picks the best epoch


@pytest.mark.parametrize("isa, channels_last, expected", [("native", "auto", True), ("avx2", "auto", False),
                                                          ("avx2", "on", True), ("native", "off", False)])
def test_cpu_memory_format_follows_the_isa_pin(isa, channels_last, expected):
    # auto: channels_last on a native-ISA CPU (faster oneDNN convolutions), the default layout under the AVX2 pin
    # (whose same-bits-everywhere promise was verified in that layout); bf16 stays off on the CPU either way
    n = Numerics.from_runtime(config.Runtime(device="cpu", cpu_isa=isa, channels_last=channels_last))
    assert (n.channels_last, n.bf16) == (expected, False)
    model = n.prepare_model(models.create("resnet8", 10))
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == expected


@pytest.mark.skipif(not torch.backends.mkl.is_available() or platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="an x86-64 torch build with MKL")
def test_the_avx2_pin_covers_every_cpu_library():
    # torch's CPU kernels come from three libraries, each with its own ISA dispatch; the pin must reach all three, or
    # a linear layer's GEMM runs MKL's AVX-512 code on one CPU and another path on the next (seen: an Intel Xeon)
    code = ("import torch; from kdpipe import config, runtime; runtime.pin_cpu(config.Runtime(cpu_isa='avx2')); "
            "torch.ones(8, 8) @ torch.ones(8, 8); print(torch.backends.cpu.get_cpu_capability())")
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "MKL_CBWR")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MKL_VERBOSE": "1"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "AVX2" and "CNR:COMPATIBLE" in out
    conv = ("import torch; from kdpipe import config, runtime; runtime.pin_cpu(config.Runtime(cpu_isa='avx2')); "
            "torch.nn.functional.conv2d(torch.ones(2, 16, 16, 16), torch.ones(16, 16, 3, 3), padding=1)")
    out = subprocess.run([sys.executable, "-c", conv], env={**env, "ONEDNN_VERBOSE": "1"},
                         capture_output=True, text=True, check=True).stdout
    isa = [line for line in out.splitlines() if ",isa:" in line]
    assert len(isa) == 1 and isa[0].endswith("AVX2") and "convolution" in out and "avx512" not in out.lower()
