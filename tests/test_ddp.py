"""Multi-process training with torchrun + DDP on the CPU (gloo), against a single-process run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from kdpipe import checkpoint
from kdpipe.cli import app

from .conftest import tiny_params, write_params

pytestmark = pytest.mark.slow  # most tests here start whole processes under torchrun
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
WORLD = 2


def per_rank_batch_norm(monkeypatch, world: int = WORLD):
    """BatchNorm in training as `world` DDP ranks on the CPU compute it, in this one process (SyncBatchNorm is
    CUDA-only): rank r holds images r, r + world, ... of each batch (the sources' shards) and normalises them by
    their own statistics; the running statistics are rank 0's (DDP broadcasts rank 0's buffers to the others
    before every forward). A single process with it computes what the DDP run computes."""
    forward = nn.BatchNorm2d.forward

    def sharded(self, x):
        if not self.training:
            return forward(self, x)
        shards = [forward(self, x[0::world])]  # rank 0's: the one update of the running statistics kept
        shards += [F.batch_norm(x[r::world], None, None, self.weight, self.bias, True, 0.0, self.eps)
                   for r in range(1, world)]
        return torch.stack(shards, 1).flatten(0, 1)  # back in batch order: image i * world + r is shard r's i-th

    monkeypatch.setattr(nn.BatchNorm2d, "forward", sharded)


def torchrun(*args, env=None):
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(WORLD), "-m", "kdpipe", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture
def ddp_dir(workdir):
    write_params(workdir / "params.yaml", tiny_params(teacher={"model": "resnet8", "epochs": 3}))
    assert CliRunner().invoke(app, ["data"]).exit_code == 0
    return workdir


def assert_same_history(single: list, ddp: list, train_rel: float, test_rel: float):
    """The DDP run's history is the single process's (run with per_rank_batch_norm) up to fp32 rounding: the two
    compute the same sums in another order (the gradient all-reduce adds the two ranks' averages; each rank's
    convolutions and BN sums run over its own half of the batch): ~1e-7 relative at the first step. Training then
    amplifies such differences step by step (a 1e-6 change of the learning rate alone moves the third epoch's
    train loss of the fixture's run, 18 steps, by 2.5e-4), so the bounds are per test: ~10x what was measured."""
    assert [r["epoch"] for r in ddp] == [r["epoch"] for r in single]
    for a, b in zip(single, ddp):
        assert set(a) == set(b) and {k: a[k] for k in ("lr", "train_top1", "test_top1")} == \
            {k: b[k] for k in ("lr", "train_top1", "test_top1")}
        for k in ("train_loss", "loss_ce"):
            assert b[k] == pytest.approx(a[k], rel=train_rel, abs=0), (a["epoch"], k)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=test_rel, abs=0), a["epoch"]


def test_ddp_matches_single_process_and_writes_once(ddp_dir, monkeypatch):
    # 2 steps per epoch (batch 48 of 96 images), so the 3 epochs stay within rounding of each other
    write_params(ddp_dir / "params.yaml", tiny_params(teacher={"model": "resnet8", "epochs": 3, "batch_size": 48}))
    with monkeypatch.context() as m:
        per_rank_batch_norm(m)
        assert CliRunner().invoke(app, ["teacher", "--name", "single"]).exit_code == 0
    proc = torchrun("teacher", "--name", "ddp")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("ddp: epoch 3/3") == 1  # only rank 0 reports
    single = checkpoint.load_checkpoint(ddp_dir / "models/single.pt")
    ddp = checkpoint.load_checkpoint(ddp_dir / "models/ddp.pt")
    assert [r["epoch"] for r in ddp["history"]] == [1, 2, 3]
    # measured: train loss 1.4e-7, 1.2e-6, 0; test loss (BN running statistics, rank 0's) 1.7e-6, 1.2e-5, 1.1e-5
    assert_same_history(single["history"], ddp["history"], train_rel=1e-5, test_rel=1e-4)
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


def test_ddp_with_the_stream_source(workdir, photos, monkeypatch):
    """Each rank decodes its own shard of every batch from the files: the history is the single process's (same
    images, same augmentation, per-rank BN emulated), and only rank 0 writes."""
    write_params(workdir / "params.yaml", tiny_params(
        data={"dataset": "folder", "path": str(photos), "image_size": 32, "source": "stream"},
        teacher={"model": "resnet8", "epochs": 2, "batch_size": 6, "runtime": {"device": "cpu", "workers": 1}}))
    assert CliRunner().invoke(app, ["data"]).exit_code == 0
    with monkeypatch.context() as m:
        per_rank_batch_norm(m)
        assert CliRunner().invoke(app, ["teacher", "--name", "single"]).exit_code == 0
    proc = torchrun("teacher", "--name", "ddp")
    assert proc.returncode == 0, proc.stderr
    single = checkpoint.load_checkpoint(workdir / "models/single.pt")
    ddp = checkpoint.load_checkpoint(workdir / "models/ddp.pt")
    assert [r["epoch"] for r in ddp["history"]] == [1, 2]
    # BN over 3 images per rank amplifies rounding faster: measured train loss 8.4e-6, 4.8e-5; test 1.3e-5, 5.8e-6
    assert_same_history(single["history"], ddp["history"], train_rel=5e-4, test_rel=2e-4)
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
    monkeypatch.setattr(engine, "train_group", lambda group, source, ctx: seen.update(run=group[0], source=source, ctx=ctx))
    runs.distill([runs.Student(["kd"], None, "kd", p.student)], p, workdir / "models/teacher.pt", workdir / "data/prepared")
    assert len(made) == 1 and seen["numerics"] == [1] and seen["ctx"] is made[0]
    dev = made[0].numerics.device
    assert seen["source"].numerics is made[0].numerics and seen["source"].train_labels.device == dev
    teacher = seen["run"].objective.teacher
    assert {t.device for t in [*teacher.parameters(), *teacher.buffers()]} == {dev}
