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
