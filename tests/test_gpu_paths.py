"""The GPU-default code paths (bf16 autocast, channels_last, torch.compile) exercised on the CPU:
train, distil with a feature method, resume after an interruption, and read the checkpoint back."""

import json
import math

import pytest
from typer.testing import CliRunner

from kdpipe.cli import app

from .conftest import tiny_params, write_params


def invoke(*args, env=None, code=0):
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == code, result.output
    return result.output


def run_all(workdir, runtime: dict, epochs: int, check_identical: bool):
    runtime = {"device": "cpu", "bf16": "off", "channels_last": "off", "compile": False, "sync_bn": False, **runtime}
    write_params(workdir / "params.yaml", tiny_params(teacher={"runtime": runtime, "epochs": epochs},
                                                     student={"runtime": runtime, "epochs": epochs}))
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
    for name in ("teacher", "nst"):
        invoke("evaluate", name)
        m = json.loads((workdir / f"metrics/{name}.json").read_text())
        assert m["epochs"] == epochs and 0 <= m["top1_last"] <= 100
        log = json.loads((workdir / f"logs/{name}.json").read_text())
        assert {k: log[k] for k in ("bf16", "channels_last")} == {k: runtime[k] == "on" for k in ("bf16", "channels_last")}
        timing = json.loads((workdir / f"logs/{name}.timing.json").read_text())
        assert (timing["compile_seconds"] > 0) == runtime["compile"]
    import torch

    for name in ("teacher", "nst"):
        ckpt = torch.load(workdir / f"models/{name}.pt", weights_only=True)
        assert all(math.isfinite(row["train_loss"]) for row in ckpt["history"])


def test_bf16_and_channels_last_on_cpu(workdir):
    run_all(workdir, {"bf16": "on", "channels_last": "on"}, epochs=2, check_identical=True)


@pytest.mark.compile
def test_torch_compile_on_cpu(workdir):
    run_all(workdir, {"compile": True}, epochs=2, check_identical=False)
