"""Multi-process training with torchrun + DDP on the CPU (gloo), against a single-process run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdpipe import checkpoint
from kdpipe.cli import app

from .conftest import tiny_params, write_params

pytestmark = pytest.mark.slow  # most tests here start whole processes under torchrun
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
TOLERANCE = 0.1  # per-epoch train loss, |DDP - single|: ranks keep their own BN statistics (batch 8 vs 16)


def torchrun(*args, env=None):
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "kdpipe", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture
def ddp_dir(workdir):
    write_params(workdir / "params.yaml", tiny_params(teacher={"model": "resnet8", "epochs": 3}))
    assert CliRunner().invoke(app, ["data"]).exit_code == 0
    return workdir


def test_ddp_matches_single_process_and_writes_once(ddp_dir):
    assert CliRunner().invoke(app, ["teacher", "--name", "single"]).exit_code == 0
    proc = torchrun("teacher", "--name", "ddp")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("ddp: epoch 3/3") == 1  # only rank 0 reports
    single = checkpoint.load_checkpoint(ddp_dir / "models/single.pt")
    ddp = checkpoint.load_checkpoint(ddp_dir / "models/ddp.pt")
    assert [r["epoch"] for r in ddp["history"]] == [1, 2, 3]
    for a, b in zip(single["history"], ddp["history"]):
        assert abs(a["train_loss"] - b["train_loss"]) < TOLERANCE
    assert abs(single["history"][0]["train_loss"] - ddp["history"][0]["train_loss"]) < 0.01
    assert '"world_size": 2' in (ddp_dir / "logs/ddp.json").read_text()
    assert sorted(p.name for p in (ddp_dir / "models").iterdir()) == ["ddp.pt", "single.pt"]  # no strays


def test_ddp_resume_equals_uninterrupted(ddp_dir):
    assert torchrun("teacher", "--name", "full").returncode == 0
    cut = torchrun("teacher", "--name", "cut", env={"KDPIPE_STOP_AFTER": "1"})
    assert cut.returncode != 0 and (ddp_dir / "models/cut.pt.resume").is_file()
    resumed = torchrun("teacher", "--name", "cut")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1/3" in resumed.stderr
    assert (ddp_dir / "models/cut.pt").read_bytes() == (ddp_dir / "models/full.pt").read_bytes()


def test_batch_must_split_across_ranks(ddp_dir):
    write_params(ddp_dir / "params.yaml", tiny_params(teacher={"model": "resnet8", "batch_size": 15}))
    proc = torchrun("teacher")
    assert proc.returncode != 0 and "batch_size 15 is not divisible by the 2 processes" in proc.stderr


def test_ddp_with_the_stream_source(workdir, photos):
    """Each rank decodes its own shard of every batch from the files: the first epoch's loss is the single
    process's (same images, same augmentation), and only rank 0 writes."""
    write_params(workdir / "params.yaml", tiny_params(
        data={"dataset": "folder", "path": str(photos), "image_size": 32, "source": "stream"},
        teacher={"model": "resnet8", "epochs": 2, "batch_size": 6, "runtime": {"device": "cpu", "workers": 1}}))
    assert CliRunner().invoke(app, ["data"]).exit_code == 0
    assert CliRunner().invoke(app, ["teacher", "--name", "single"]).exit_code == 0
    proc = torchrun("teacher", "--name", "ddp")
    assert proc.returncode == 0, proc.stderr
    single = checkpoint.load_checkpoint(workdir / "models/single.pt")
    ddp = checkpoint.load_checkpoint(workdir / "models/ddp.pt")
    assert [r["epoch"] for r in ddp["history"]] == [1, 2]
    assert abs(single["history"][0]["train_loss"] - ddp["history"][0]["train_loss"]) < 0.05
    assert sorted(p.name for p in (workdir / "models").iterdir()) == ["ddp.pt", "single.pt"]


def test_run_context_puts_each_rank_on_its_own_gpu(monkeypatch):
    """torchrun's rank 1 of 2 on a machine of GPUs (simulated on the CPU): the device is cuda:LOCAL_RANK, made
    the current device before NCCL starts, so nothing lands on cuda:0 by default."""
    import torch.distributed as dist

    from kdpipe import config, runtime

    calls = []
    for k, v in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # set_determinism's CUDA choice, undone after
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    for device in ("auto", "cuda"):
        calls.clear()
        ctx = runtime.context(config.Runtime(device=device))
        assert ctx.numerics.device == torch.device("cuda", 1) and ctx.dist == runtime.Ranks(1, 2, 1)
        assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl")]
        assert ctx.numerics.bf16 and ctx.numerics.channels_last


def test_a_distillation_places_everything_by_one_run_context(workdir, monkeypatch):
    """`kdpipe distill` builds the run context once: the data source, the teacher, the objective and the loop
    all take their device from it (a second, differently resolved one put rank 1's data on cuda:0)."""
    from kdpipe import config, engine, runs, runtime
    from kdpipe.prepare import prepare

    p = config.validate(tiny_params())
    prepare(p.data, workdir / "data/prepared")
    runs.train("teacher", p.teacher, "teacher", workdir / "data/prepared")
    made, seen = [], {}
    context = runtime.context
    monkeypatch.setattr(runtime, "context", lambda cfg: made.append(context(cfg)) or made[-1])
    numerics = runtime.Numerics.from_runtime
    monkeypatch.setattr(runtime.Numerics, "from_runtime", lambda *a, **k: seen.setdefault("numerics", []).append(1)
                        or numerics(*a, **k))
    monkeypatch.setattr(engine, "train", lambda run, source, ctx: seen.update(run=run, source=source, ctx=ctx))
    runs.distill(["kd"], p, p.student, workdir / "models/teacher.pt", "kd", workdir / "data/prepared")
    assert len(made) == 1 and seen["numerics"] == [1] and seen["ctx"] is made[0]
    dev = made[0].numerics.device
    assert seen["source"].numerics is made[0].numerics and seen["source"].train_labels.device == dev
    teacher = seen["run"].objective.teacher
    assert {t.device for t in [*teacher.parameters(), *teacher.buffers()]} == {dev}
