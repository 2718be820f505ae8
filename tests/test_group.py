"""Students trained together (`kdpipe distill -m kd -m dkd ...`): one data pass and one teacher forward per batch
and teacher mode, each student's checkpoint and log equal to its solo run's, byte for byte, through interruptions."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

from kdpipe import config, data, engine, models, runs
from kdpipe.prepare import prepare
from kdpipe.cli import app
from kdpipe.distill import TeacherPass

from .conftest import tiny_params

# OFD: the teacher's BN on batch statistics (another teacher mode); DOT: its own optimiser; CRD: a sampler and a
# memory bank; FT: an init stage (a longer run); MLKD: a strong view (a group of its own); kd+at: a combination
GROUP = ["kd", "dkd", "ofd", "dot", "crd", "ft", "mlkd", "kd+at"]
PARAMS = tiny_params(distill={"crd": {"nce_k": 16}, "ft": {"init_epochs": 1}})


def invoke(*args, env=None, code=0):
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == code, result.output
    return result.output


def outputs(workdir, names):
    """Each student's checkpoint and log (its timings are in another file)."""
    return {n: ((workdir / f"models/{n}.pt").read_bytes(), (workdir / f"logs/{n}.json").read_bytes()) for n in names}


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """The teacher, and each student trained alone."""
    d = tmp_path_factory.mktemp("group")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        (d / "params.yaml").write_text(yaml.safe_dump(PARAMS))
        invoke("data")
        invoke("teacher")
        for m in GROUP:
            invoke("distill", "-m", m)
        alone = outputs(d, GROUP)
    return d, alone


def grouped_copy(solo, tmp_path):
    d, alone = solo
    shutil.copytree(d / "data", tmp_path / "data")
    shutil.copy(d / "params.yaml", tmp_path)
    (tmp_path / "models").mkdir()
    shutil.copy(d / "models/teacher.pt", tmp_path / "models")
    return alone


def test_grouped_students_equal_their_solo_runs(solo, tmp_path, monkeypatch):
    alone = grouped_copy(solo, tmp_path)
    monkeypatch.chdir(tmp_path)
    calls = []
    original = TeacherPass.__call__

    def counting(self, x, mode, forward):
        calls.append(mode)
        return original(self, x, mode, lambda: (forwards.append(mode), forward())[1])

    forwards = []
    monkeypatch.setattr(TeacherPass, "__call__", counting)
    invoke("distill", *[a for m in GROUP for a in ("-m", m)])
    assert outputs(tmp_path, GROUP) == alone
    # one teacher forward per batch and teacher mode, not one per student: 6 steps an epoch; epochs 1-2 in the plain
    # mode and OFD's (BN on batch statistics), epoch 3 for FT alone (its init epoch came first); MLKD's group (the
    # strong view) 2 epochs apart
    steps = 96 // 16
    assert len(forwards) == steps * (2 * 2 + 1) + steps * 2
    assert len(calls) == steps * (2 * 7 + 1) + steps * 2  # each student asks on each of its steps
    timing = json.loads((tmp_path / "logs/kd.timing.json").read_text())
    assert timing["group"] == [m for m in GROUP if m != "mlkd"]


def test_grouped_run_resumes_bit_identical(solo, tmp_path, monkeypatch):
    alone = grouped_copy(solo, tmp_path)
    monkeypatch.chdir(tmp_path)
    names = ["kd", "ofd", "ft"]
    args = [a for m in names for a in ("-m", m)]
    invoke("distill", *args, env={"KDPIPE_STOP_AFTER": "1"}, code=130)
    assert all((tmp_path / f"models/{n}.pt.resume").exists() for n in names)
    # killed between two students' epoch checkpoints: one of them a whole epoch behind the others
    (tmp_path / "models/ofd.pt.resume").unlink()
    out = invoke("distill", *args)
    assert outputs(tmp_path, names) == {n: alone[n] for n in names}
    assert not any((tmp_path / "models").glob("*.resume"))


def test_grouped_process_killed_with_sigkill_resumes_bit_identical(solo, tmp_path):
    """A real process training three students (CRD: a sampler and a memory bank; OFD: another teacher mode), killed
    with SIGKILL between two students' checkpoints of its first epoch (each checkpoint write is followed by a 0.3 s
    pause, so the kill lands there), then run again: each student's files equal its solo run's."""
    alone = grouped_copy(solo, tmp_path)
    names = ["kd", "crd", "ofd"]
    args = [a for m in names for a in ("-m", m)]
    paused = ("import sys, time; from kdpipe import checkpoint as c; save = c.atomic_save; "
              "c.atomic_save = lambda *a: (save(*a), time.sleep(0.3))[0]; from kdpipe.cli import main; main()")
    proc = subprocess.Popen([sys.executable, "-c", paused, "distill", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first, deadline = tmp_path / "models/kd.pt.resume", time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert [n for n in names if (tmp_path / f"models/{n}.pt.resume").exists()] == ["kd"]  # the others: no epoch yet
    assert not any((tmp_path / f"models/{n}.pt").exists() for n in names)
    again = subprocess.run([sys.executable, "-m", "kdpipe", "distill", *args], cwd=tmp_path, capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr
    assert "kd: resuming after epoch 1/2" in again.stderr
    assert outputs(tmp_path, names) == {n: alone[n] for n in names}
    assert not any((tmp_path / "models").glob("*.resume"))


def test_each_student_draws_its_own_random_streams(tmp_path):
    """Dropout draws from the process's generator on every step: two students of one group each draw what they
    would alone (the engine swaps their streams), so both equal the solo run."""
    cfg = config.validate(tiny_params()).student
    prepare(config.validate(tiny_params()).data, tmp_path / "prepared")
    prepared = data.load(tmp_path / "prepared")

    def run(name, streams=None):
        torch.manual_seed(cfg.seed)
        model = models.create(cfg.model, 10)
        model.fc = torch.nn.Sequential(torch.nn.Dropout(0.5), model.fc)
        return engine.Run(name=name, model=model, cfg=cfg, out=tmp_path / f"{name}.pt", log=tmp_path / f"{name}.json",
                          progress=False)

    engine.train(run("alone"), prepared)
    first = run("first")
    first.streams = __import__("kdpipe.checkpoint").checkpoint.random_streams(torch.device("cpu"))
    engine.train_group([first, run("second")], prepared)
    alone = (tmp_path / "alone.pt").read_bytes()
    assert (tmp_path / "first.pt").read_bytes() == alone and (tmp_path / "second.pt").read_bytes() == alone


def test_groups_follow_recipes_and_views():
    cfg = config.validate(tiny_params()).student
    other = cfg.model_copy(update={"batch_size": 32})
    students = [runs.Student(["kd"], None, "kd", cfg), runs.Student(["mlkd"], None, "mlkd", cfg),
                runs.Student(["dkd"], None, "dkd", other), runs.Student(["at"], None, "at", cfg)]
    assert [[s.name for s in g] for g in runs.groups(students)] == [["kd", "at"], ["mlkd"], ["dkd"]]


def test_repeated_method_and_name_are_one_line_errors(workdir):
    out = invoke("distill", "-m", "kd", "-m", "kd", code=2)
    assert "--method 'kd' is given more than once" in out
    out = invoke("distill", "-m", "kd", "-m", "dkd", "--name", "x", code=2)
    assert "--name 'x' names one student, but --method is given 2 times (a pattern with {method} names each)" in out
