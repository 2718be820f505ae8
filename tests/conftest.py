import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools.stage_deps import tracing
from tools.stand_in_teacher import published_checkpoint

ROOT = Path(__file__).resolve().parents[1]

_TRAIN = {
    "model": "resnet8", "seed": 0, "epochs": 2, "batch_size": 16,
    "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False},
    "schedule": {"milestones": [0.5, 0.75], "gamma": 0.1, "warmup_epochs": 0},
    "runtime": {"device": "cpu", "bf16": "auto", "channels_last": "auto", "compile": False, "sync_bn": False},
}
TINY = {
    "data": {"dataset": "synthetic", "mirror": None,
             "synthetic": {"num_classes": 10, "train_size": 96, "test_size": 40, "seed": 0}},
    "teacher": {**copy.deepcopy(_TRAIN), "model": "resnet14"},
    "student": copy.deepcopy(_TRAIN),
    "distill": {"kd": {"gamma": 0.1, "alpha": 0.9, "temperature": 4.0},
                "at": {"gamma": 1.0, "alpha": 0.0, "temperature": 4.0, "beta": 1000.0, "p": 2.0},
                "nst": {"gamma": 1.0, "alpha": 0.0, "temperature": 4.0, "beta": 50.0},
                "fsp": {"gamma": 1.0, "alpha": 0.0, "temperature": 4.0, "beta": 1.0, "init_epochs": 0},
                "fitnets": {"gamma": 1.0, "alpha": 0.0, "temperature": 4.0, "beta": 100.0, "hint_layer": 2,
                            "regressor_kernel": 1, "init_epochs": 0},
                "crd": {"nce_k": 64}, "dkd": {"warmup_epochs": 1}},
    "evaluate": {"batch_size": 64, "device": "cpu"},
}


# The suite runs in parallel (`make test`: pytest-xdist, one worker per core, one torch thread each, so the workers
# do not oversubscribe the cores). Tests on one of the DVC projects reproduced once per session share a worker
# (`--dist loadgroup`), so each project is built once; they are `slow` (`pytest -m "not slow"` skips them).
PROJECT_FIXTURES = ("repo", "smoke_pipeline", "smoke_grouped")  # the first a test uses names its group
TIMEOUT = {"slow": 1800, "fast": 600}  # seconds per test, fixtures included: a hung test fails instead of CI


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"  # for the commands the tests start, too
        import torch

        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        project = next((f for f in PROJECT_FIXTURES if f in item.fixturenames), None)
        speed = "slow" if project or item.get_closest_marker("slow") else "fast"
        item.add_marker(getattr(pytest.mark, speed))
        if project:
            item.add_marker(pytest.mark.xdist_group(project))
        if not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(TIMEOUT[speed]))


def deep_update(d: dict, updates: dict) -> dict:
    for k, v in updates.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            deep_update(d[k], v)
        else:
            d[k] = v
    return d


def tiny_params(**updates) -> dict:
    return deep_update(copy.deepcopy(TINY), updates)


def invoke(*args, env=None, code=0) -> str:
    """`kdpipe ARGS` run in this process (typer's test runner), its exit code `code`: its output."""
    from typer.testing import CliRunner

    from kdpipe.cli import app

    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == code, result.output
    return result.output


def built_project(d: Path, params: dict, commands) -> Path:
    """The folder `d` with `params` as its params.yaml, after each of `commands` (kdpipe's arguments) ran there."""
    here = os.getcwd()
    os.chdir(d)
    try:
        (d / "params.yaml").write_text(yaml.safe_dump(params))
        for args in commands:
            invoke(*args)
    finally:
        os.chdir(here)
    return d


def project_copy(built: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of the project `built` to change, as the current directory."""
    d = tmp_path / "p"
    shutil.copytree(built, d)
    monkeypatch.chdir(d)
    return d


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch project folder with tiny params.yaml, as the current directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    return tmp_path


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params))
    return path


def distill_runs(tmp_path: Path, p, methods: list[str]):
    """Prepared tiny data and a factory of identical distillation runs (a fixed teacher, the student
    seeded from `p.student.seed`), for resume tests: `make(out, stop_after=None) -> engine.Run`."""
    import torch

    from kdpipe import data, engine, models
    from kdpipe.prepare import prepare
    from kdpipe.distill import Distiller, TrainData, feature_shapes

    prepare(p.data, tmp_path / "prepared")
    prepared = data.load(tmp_path / "prepared")
    torch.manual_seed(5)
    teacher = models.create("resnet14", 10)

    def make(out, stop_after=None):
        torch.manual_seed(p.student.seed)
        student = models.create("resnet8", 10)
        obj = Distiller(teacher, methods, p.distill, feature_shapes(student), feature_shapes(teacher),
                        TrainData(prepared.train.y))
        return engine.Run(name="+".join(methods), model=student, cfg=p.student, out=out, log=tmp_path / "log.json",
                          objective=obj, meta={"role": "distill"}, stop_after=stop_after, progress=False)

    return prepared, make


# --- DVC projects reproduced once per session --------------------------------------------------------
DVC = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))


def sh(*args, cwd, env=None):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="session")
def repo(tmp_path_factory):
    """A git+DVC repo with the project's dvc.yaml and kdpipe sources, reproduced once on tiny params (that
    run's imports traced in the sibling folder `<repo>-traces`)."""
    d = tmp_path_factory.mktemp("repo")
    shutil.copytree(ROOT / "kdpipe", d / "kdpipe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", d)
    shutil.copy(ROOT / ".gitignore", d)
    (d / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    sh("git", "init", "-q", cwd=d)
    sh(DVC, "init", "-q", cwd=d)
    shutil.copytree(ROOT / ".dvc" / "plots", d / ".dvc" / "plots")
    sh(DVC, "repro", "-q", cwd=d, env=tracing(d.with_name(d.name + "-traces")))
    assert json.loads(sh(DVC, "status", "--json", cwd=d)) == {}
    return d




def smoke_params(raw: dict) -> dict:
    """A full pipeline's params shrunk to seconds on a CPU: tiny synthetic data, one-epoch recipes, one seed, a
    grid with every kind of stage (the ResNet table, a trained model and a published teacher under another
    recipe, one pair) and every method."""
    p = copy.deepcopy(raw)
    p["data"].update(dataset="synthetic", synthetic={"num_classes": 10, "train_size": 64, "test_size": 32, "seed": 0})
    for recipe in p["recipes"].values():
        recipe.update(epochs=1, batch_size=32)
    p.update(table_models=["resnet8"], models=["resnet8"], published=["resnet14"], seeds=[0],
             pairs=[{"teacher": "resnet14", "student": "resnet8"}], wkd_teachers=["resnet14"])
    deep_update(p["distill"], {"fsp": {"init_epochs": 1}, "ab": {"init_epochs": 1}, "ft": {"init_epochs": 1},
                               "crd": {"nce_k": 16}, "dkd": {"warmup_epochs": 1}})
    return p


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory) -> Path:
    """pipelines/cifar100 (the full pipelines' one stage definition) in a git repo on `smoke_params`,
    reproduced once with its imports traced (in `<repo>-traces`) and committed: returns the pipeline folder."""
    return reproduced_pipeline(tmp_path_factory.mktemp("smoke"),
                               smoke_params(yaml.safe_load((ROOT / "pipelines/cifar100/params.yaml").read_text())))


@pytest.fixture(scope="session")
def smoke_grouped(tmp_path_factory) -> Path:
    """The smoke pipeline in its grouped form (`group_students: true`: one distill stage per pair and seed), on a
    few methods (one with another teacher mode, one with an init stage, one with a view of its own) and the +LS
    variants, its dvc.yaml rendered from those params."""
    from pipelines.render import render_params

    p = smoke_params(yaml.safe_load((ROOT / "pipelines/cifar100/params.yaml").read_text()))
    p.update(group_students=True, methods=["kd", "dkd", "ofd", "ft", "mlkd"])
    return reproduced_pipeline(tmp_path_factory.mktemp("grouped"), p, render_params(p))


def reproduced_pipeline(d: Path, params: dict, dvc_yaml: str | None = None) -> Path:
    """pipelines/cifar100's folder under `d` with `params` (and `dvc_yaml`, else the committed one), in a git repo,
    reproduced once with its imports traced (in `<d>-traces`) and committed: returns the pipeline folder."""
    shutil.copytree(ROOT / "kdpipe", d / "kdpipe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".gitignore", d)
    folder = d / "pipelines" / "cifar100"
    (folder / ".dvc").mkdir(parents=True)
    for f in ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore"):
        shutil.copy(ROOT / "pipelines" / "cifar100" / f, folder / f)
    if dvc_yaml is not None:
        (folder / "dvc.yaml").write_text(dvc_yaml)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    published_checkpoint("resnet14", folder / "published" / "resnet14.pth")
    sh("git", "init", "-q", cwd=d)
    sh("git", "add", "-A", cwd=d)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "smoke", cwd=d)
    sh(DVC, "repro", "-q", cwd=folder, env=tracing(d.with_name(d.name + "-traces")))
    sh("git", "add", "-A", cwd=d)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro", cwd=d)
    return folder


@pytest.fixture
def photos(tmp_path):
    """An image folder of mixed sizes and formats (3 classes): what a user's photos look like."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for c in ("cat", "dog", "owl"):
            (tmp_path / "photos" / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(40, 90, 2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "photos" / split / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    return tmp_path / "photos"
