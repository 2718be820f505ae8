"""Resume ends bit-identical to an uninterrupted run for models that draw random numbers in their forward
pass (torchvision's MobileNetV3 Dropout, timm's drop-path), on both data sources, and for whole processes
killed with SIGKILL in the middle of an epoch (MLKD's strong view and CRD's memory bank among the methods)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import timm  # the test install has kdpipe[timm]: a broken timm is a failure, not a skip
import torch
import yaml

from kdpipe import config, data, engine, models, runs
from kdpipe.prepare import prepare
from kdpipe.checkpoint import model_path

from .conftest import tiny_params


def folder_project(workdir, photos, source: str) -> config.Params:
    d = {"dataset": "folder", "path": str(photos), "image_size": 32, "source": source} if source else {}
    p = config.validate(tiny_params(data=d, student={"model": "tv/mobilenet_v3_small", "epochs": 3, "batch_size": 6,
                                                     "runtime": {"workers": 2}}))
    prepare(p.data, workdir / "data/prepared")
    return p


@pytest.mark.parametrize("source", ["memory", "stream"])
def test_resume_continues_dropout_where_it_stopped(workdir, photos, monkeypatch, source):
    p = folder_project(workdir, photos, source)
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in models.create(p.student.model, 3).modules())
    runs.train("student", p.student, "full", workdir / "data/prepared")
    monkeypatch.setenv("KDPIPE_STOP_AFTER", "1")
    with pytest.raises(KeyboardInterrupt):
        runs.train("student", p.student, "cut", workdir / "data/prepared")
    monkeypatch.delenv("KDPIPE_STOP_AFTER")
    torch.rand(7)  # a fresh process's default generator is wherever the run's seeding left it, not mid-run
    runs.train("student", p.student, "cut", workdir / "data/prepared")
    assert model_path("cut").read_bytes() == model_path("full").read_bytes()


def test_resume_continues_timm_drop_path(tmp_path):
    from kdpipe.models.timm_models import _with_features

    p = config.validate(tiny_params(student={"epochs": 3}))
    prepare(p.data, tmp_path / "prepared")
    prepared = data.load(tmp_path / "prepared")

    def run(out, stop_after=None):
        torch.manual_seed(0)
        model = _with_features(timm.create_model("resnet10t", num_classes=10, drop_path_rate=0.3))
        return engine.Run(name="s", model=model, cfg=p.student, out=out, log=tmp_path / "log.json",
                          stop_after=stop_after, progress=False)

    assert any(type(m).__name__ == "DropPath" for m in run(tmp_path / "x.pt").model.modules())
    engine.train(run(tmp_path / "full.pt"), prepared)
    with pytest.raises(KeyboardInterrupt):
        engine.train(run(tmp_path / "cut.pt", 1), prepared)
    engine.train(run(tmp_path / "cut.pt"), prepared)
    assert (tmp_path / "cut.pt").read_bytes() == (tmp_path / "full.pt").read_bytes()


def kdpipe(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "kdpipe", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return err


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(workdir, photos):
    """Real processes on streamed images with 2 workers: a MobileNetV3 (Dropout) student distilled with MLKD
    (the strong view) and CRD (the memory bank), killed with SIGKILL during its second epoch."""
    p = tiny_params(data={"dataset": "folder", "path": str(photos), "image_size": 32, "source": "stream"},
                    teacher={"epochs": 1, "batch_size": 6, "runtime": {"workers": 2}},
                    student={"model": "tv/mobilenet_v3_small", "epochs": 4, "batch_size": 6, "runtime": {"workers": 2}},
                    distill={"crd": {"nce_k": 8}})
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    p = config.validate(p)
    prepare(p.data, workdir / "data/prepared")
    runs.train("teacher", p.teacher, "teacher", workdir / "data/prepared")
    full = kdpipe("distill", "-m", "crd+mlkd", "--name", "full", cwd=workdir)
    cut = kdpipe("distill", "-m", "crd+mlkd", "--name", "cut", cwd=workdir)
    resume = workdir / "models/cut.pt.resume"
    deadline = time.monotonic() + 300
    while not resume.exists() and cut.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(cut.pid, signal.SIGKILL)  # in the epoch after the first resume state was written
    cut.communicate()
    assert cut.returncode == -signal.SIGKILL and not (workdir / "models/cut.pt").exists()
    assert torch.load(resume, weights_only=True)["epoch"] < 4
    finish(full)
    err = finish(kdpipe("distill", "-m", "crd+mlkd", "--name", "cut", cwd=workdir))
    assert "resuming after epoch" in err
    assert (workdir / "models/cut.pt").read_bytes() == (workdir / "models/full.pt").read_bytes()
