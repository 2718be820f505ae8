"""The full pipelines' stage graphs (static checks; the smoke run itself is in .ci/run)."""

import pytest
import yaml

from kdpipe import config

from .conftest import ROOT
from .test_pipeline import DVC, dag_edges, sh

EXPECTED = {"cifar10": 10, "cifar100": 100}


@pytest.mark.parametrize("name", EXPECTED)
def test_params_validate_with_recipes(name):
    p = config.load_params(ROOT / "pipelines" / name / "params.yaml")
    assert p.data.dataset == name and p.data.synthetic.num_classes == EXPECTED[name]
    assert p.teachers == ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
    he = p.recipes["he2016"]  # batch 128, SGD 0.9, wd 1e-4, lr 0.1 /10 at 50 % and 75 %, 164 epochs
    assert (he.epochs, he.batch_size, he.optim.lr, he.optim.momentum, he.optim.weight_decay) == (164, 128, 0.1, 0.9, 1e-4)
    assert he.schedule.milestones == [0.5, 0.75]
    rd = p.recipes["repdistiller"]
    assert [round(m * rd.epochs) for m in rd.schedule.milestones] == [150, 180, 210] and rd.epochs == 240
    assert (rd.batch_size, rd.optim.lr, rd.optim.weight_decay) == (64, 0.05, 5e-4)
    # CIFAR-100 compares with CRD's figures, which come from RepDistiller's recipe; CIFAR-10 keeps He et al.'s
    recipe = {"cifar10": "he2016", "cifar100": "repdistiller"}[name]
    assert p.teacher.recipe == p.student.recipe == recipe
    assert p.teacher.model_dump(exclude={"recipe", "model", "seed", "runtime"}) == \
        p.student.model_dump(exclude={"recipe", "model", "seed", "runtime"}) == p.recipes[recipe].model_dump()
    assert p.methods == list(config.METHODS)  # every method is staged for every pair
    # FSP and FitNets as RepDistiller runs them
    assert p.distill.fsp.init_epochs == 30 and p.distill.fitnets.regressor_kernel == 1


def test_recipe_overrides_and_errors():
    raw = yaml.safe_load((ROOT / "pipelines/cifar10/params.yaml").read_text())
    raw["teacher"]["epochs"] = 7
    raw["student"]["recipe"] = "repdistiller"
    p = config.validate(raw)
    assert p.teacher.epochs == 7 and p.teacher.optim.lr == 0.1  # per-key override on top of he2016
    assert p.student.epochs == 240 and p.student.batch_size == 64
    raw["student"]["recipe"] = "nope"
    with pytest.raises(config.ParamsError, match="student.recipe: unknown recipe 'nope'.*he2016, repdistiller, smoke"):
        config.validate(raw)


@pytest.mark.parametrize("name", EXPECTED)
def test_stage_graph(name):
    folder = ROOT / "pipelines" / name
    stages = [line.split()[0] for line in sh(DVC, "stage", "list", cwd=folder).splitlines()]
    n_teach, n_dist = 5 * 3, len(config.METHODS) * 3 * 3  # models x seeds, methods x pairs x seeds
    assert len(stages) == 1 + 2 * n_teach + 2 * n_dist + 1
    assert {"data", "teacher@resnet110-2", "distill@fitnets-pair2-1", "evaluate-distill@kd-pair0-0", "report"} <= set(stages)
    edges = dag_edges(folder)
    for edge in [("data", "teacher@resnet20-0"), ("teacher@resnet56-1", "distill@kd-pair0-1"),
                 ("teacher@resnet110-2", "distill@nst-pair2-2"), ("distill@kd-pair0-1", "evaluate-distill@kd-pair0-1"),
                 ("teacher@resnet20-0", "evaluate-teacher@resnet20-0"), ("evaluate-distill@fsp-pair1-0", "report"),
                 ("evaluate-teacher@resnet110-2", "report")]:
        assert edge in edges, edge
    # each distilled student depends on the teacher of its own pair and seed, and on no other
    assert {a for a, b in edges if b == "distill@at-pair1-2"} == {"data", "teacher@resnet110-2"}


def test_root_dvc_project_is_the_quickstart_alone():
    # pipelines/cifar10 and pipelines/cifar100 are DVC projects of their own (`dvc init --subdir`), so DVC
    # commands at the root see only the quickstart's stages
    for name in EXPECTED:
        assert (ROOT / "pipelines" / name / ".dvc" / "config").is_file()
    stages = {line.split()[0] for line in sh(DVC, "stage", "list", cwd=ROOT).splitlines()}
    assert "teacher" in stages and "report" in stages
    assert not any("pair" in s or s.startswith("evaluate-") for s in stages), stages
