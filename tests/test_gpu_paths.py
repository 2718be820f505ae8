"""The GPU-default code paths (bf16 autocast, channels_last, torch.compile) exercised on the CPU:
train, distil with a feature method, resume after an interruption, and read the checkpoint back."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from kdpipe import checkpoint
from kdpipe.cli import app

from .conftest import tiny_params, write_params


def invoke(*args, env=None, code=0):
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == code, result.output
    return result.output


def fp32_by_hand(ckpt_path, x_uint8: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Test loss and Top-1 (%) of a checkpoint's model by hand, not through kdpipe's sources or engine: the uint8
    test images normalised with the checkpoint's own mean/std, one fp32 batch, eager, default memory layout."""
    ckpt = checkpoint.load_checkpoint(ckpt_path)
    mean, std = (torch.tensor(ckpt["normalization"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    model = checkpoint.restore_model(ckpt).eval()
    with torch.no_grad():
        logits = model((x_uint8.float() / 255 - mean) / std)
    return F.cross_entropy(logits, y).item(), 100 * int((logits.argmax(1) == y).sum()) / len(y)


def run_all(workdir, runtime: dict, epochs: int, check_identical: bool, batch_size: int = 16, student_runtime=None):
    runtime = {"device": "cpu", "bf16": "off", "channels_last": "off", "compile": False, "sync_bn": False, **runtime}
    runtimes = {"teacher": runtime, "nst": {**runtime, **(student_runtime or {})}}
    write_params(workdir / "params.yaml", tiny_params(
        teacher={"runtime": runtimes["teacher"], "epochs": epochs, "batch_size": batch_size},
        student={"runtime": runtimes["nst"], "epochs": epochs, "batch_size": batch_size}))
    invoke("data")
    invoke("teacher")
    # a distillation with a feature method (NST: bmm-based, the one bf16 would hurt most), interrupted and resumed
    out = invoke("distill", "-m", "nst", env={"KDPIPE_STOP_AFTER": "1"}, code=130)
    assert "interrupted" in out and (workdir / "models/nst.pt.resume").is_file()
    out = invoke("distill", "-m", "nst")
    assert not (workdir / "models/nst.pt.resume").exists()
    if check_identical:  # the resumed run ends exactly where an uninterrupted one does
        invoke("distill", "-m", "nst", "--name", "nst_full")
        assert (workdir / "models/nst.pt").read_bytes() == (workdir / "models/nst_full.pt").read_bytes()
    x = torch.from_numpy(np.load(workdir / "data/prepared/test_x.npy"))
    y = torch.from_numpy(np.load(workdir / "data/prepared/test_y.npy"))
    for name, runtime in runtimes.items():
        invoke("evaluate", name)
        m = json.loads((workdir / f"metrics/{name}.json").read_text())
        history = torch.load(workdir / f"models/{name}.pt", weights_only=True)["history"]
        assert all(math.isfinite(row["train_loss"]) for row in history)
        loss, top1 = fp32_by_hand(workdir / f"models/{name}.pt", x, y)
        # `kdpipe evaluate` tests the checkpoint in fp32 whatever the training's numerics: the number computed by hand
        assert m["epochs"] == epochs and m["top1_last"] == round(top1, 2)
        assert m["top1"] == round(max(row["test_top1"] for row in history), 2)
        # the training's test evaluation of the last epoch (the model in the run's layout, never in bf16) is of the
        # same model: the same Top-1, the loss equal up to fp32 rounding (channels_last convolutions, another
        # summation order: measured <= 1.5e-7 relative; a bf16 evaluation, or bf16-rounded weights, is ~1e-3 off)
        assert history[-1]["test_top1"] == top1 and history[-1]["test_loss"] == pytest.approx(loss, rel=1e-6, abs=0)
        log = json.loads((workdir / f"logs/{name}.json").read_text())
        assert {k: log[k] for k in ("bf16", "channels_last")} == {k: runtime[k] == "on" for k in ("bf16", "channels_last")}
        timing = json.loads((workdir / f"logs/{name}.timing.json").read_text())
        assert (timing["compile_seconds"] > 0) == bool(runtime["compile"])
        # the warm-up compiled the full batch's graph and the last, smaller batch's: no epoch recompiled
        if runtime["compile"]:
            assert timing["recompilations"] == 0


def test_bf16_and_channels_last_on_cpu(workdir):
    run_all(workdir, {"bf16": "on", "channels_last": "on"}, epochs=2, check_identical=True)


@pytest.mark.compile
def test_torch_compile_on_cpu(workdir):
    # 96 training images in batches of 20: each epoch ends with a batch of 16, a second graph; the student in
    # torch.compile's reduce-overhead mode (CUDA graphs on CUDA; on the CPU the same inductor code), the teacher's
    # forward compiled with it; the teacher trained eager (its compiled training is the same code, CE's objective)
    run_all(workdir, {"compile": False}, epochs=2, check_identical=False, batch_size=20,
            student_runtime={"compile": "reduce-overhead"})


def test_compile_modes_reach_torch_compile(monkeypatch):
    from kdpipe import config
    from kdpipe import runtime as rt

    seen = []
    monkeypatch.setattr(torch, "compile", lambda m, **options: seen.append(options) or m)
    numerics = rt.Numerics.from_runtime(config.validate({"device": "cpu"}, config.Runtime))
    for value in (True, "reduce-overhead"):
        rt.wrap(torch.nn.Linear(2, 2), rt.Ranks(), numerics, value, False, False)
    assert seen == [{"dynamic": False, "mode": None}, {"dynamic": False, "mode": "reduce-overhead"}]


def compiled_student_project(workdir, monkeypatch, **distill) -> tuple[list, int]:
    """Data and an eager teacher, the student in torch.compile's reduce-overhead mode (one graph per way it is
    called: 96 images in batches of 16; test_torch_compile_on_cpu has a smaller last batch). Returns the list
    where each model `runtime.compiled` compiles is noted (its size, the mode), and the teacher's size."""
    from kdpipe import runtime

    cpu = {"device": "cpu", "bf16": "off", "channels_last": "off", "sync_bn": False}
    write_params(workdir / "params.yaml", tiny_params(
        teacher={"runtime": {**cpu, "compile": False}, "epochs": 1},
        student={"runtime": {**cpu, "compile": "reduce-overhead"}, "epochs": 1}, distill=distill))
    invoke("data")
    invoke("teacher")
    compiled, real = [], runtime.compiled

    def size(model) -> int:
        return sum(p.numel() for p in model.parameters())

    monkeypatch.setattr(runtime, "compiled", lambda m, c: compiled.append((size(m), c)) or real(m, c))
    return compiled, size(checkpoint.restore_model(checkpoint.load_checkpoint("models/teacher.pt")))


@pytest.mark.compile
def test_every_way_a_method_calls_the_models_is_compiled_before_the_epochs(workdir, monkeypatch):
    # the student: an extra view per batch (MLKD: a forward without features), an init stage training it (AB) and
    # one running it in eval mode without gradients (FT); the teacher, compiled once per command: its view forward
    # (MLKD) and its BN on batch statistics (OFD). Each a graph the warm-up builds, so no epoch recompiles
    compiled, teacher = compiled_student_project(workdir, monkeypatch, ab={"init_epochs": 1}, ft={"init_epochs": 1})
    invoke("distill", "-m", "mlkd")
    invoke("distill", "-m", "ab", "-m", "ft", "-m", "ofd")
    # the teacher as CUDA graphs for a student alone, plainly compiled for a group (whose students read its outputs
    # one after another); each student in the mode asked
    assert [c for n, c in compiled if n == teacher] == ["reduce-overhead", True]
    assert [c for n, c in compiled if n != teacher] == ["reduce-overhead"] * 4
    for name in ("mlkd", "ab", "ft", "ofd"):
        timing = json.loads((workdir / f"logs/{name}.timing.json").read_text())
        assert timing["compile_seconds"] > 0 and timing["recompilations"] == 0, name


@pytest.mark.compile
def test_a_method_torch_compile_refuses_runs_eager_and_says_why(workdir, monkeypatch):
    # DOT's two backward passes through one forward: torch.compile's backward refuses retain_graph; beside a KD
    # student, which is compiled
    compiled, teacher = compiled_student_project(workdir, monkeypatch)
    out = invoke("distill", "-m", "dot", "-m", "kd")
    assert "dot: the model runs eager, not compiled: dot runs two backward passes" in out
    timings = {n: json.loads((workdir / f"logs/{n}.timing.json").read_text()) for n in ("dot", "kd")}
    assert timings["dot"]["runs_eager"].startswith("dot runs two backward passes") and "runs_eager" not in timings["kd"]
    assert [n == teacher for n, _ in compiled] == [True, False]  # the teacher's forward and KD's student, not DOT's
    for timing in timings.values():  # the teacher's graphs and KD's student's: the warm-up's
        assert timing["compile_seconds"] > 0 and timing["recompilations"] == 0
