import copy
from pathlib import Path

import pytest
import yaml

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


def deep_update(d: dict, updates: dict) -> dict:
    for k, v in updates.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            deep_update(d[k], v)
        else:
            d[k] = v
    return d


def tiny_params(**updates) -> dict:
    return deep_update(copy.deepcopy(TINY), updates)


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
    from kdpipe.distill import Distiller, TrainData, feature_shapes

    data.prepare(p.data, tmp_path / "prepared")
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
