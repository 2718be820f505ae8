"""One list of the methods (config.Distill's fields, one file each in kdpipe/distill/) and one of the models
(what kdpipe/models/ registers): whatever else names them is tied to those lists here."""

import re

import yaml
from typer.testing import CliRunner

from kdpipe import config, distill, models
from kdpipe.cli import app

from .conftest import ROOT


def test_help_texts_list_every_method_and_dataset():
    text = " ".join(CliRunner().invoke(app, ["distill", "--help"], terminal_width=300).output.split())
    assert all(re.search(rf"\b{m}\b", text) for m in config.METHODS), text
    data_help = CliRunner().invoke(app, ["--help"], terminal_width=300).output
    assert "image folder" in data_help


def test_every_method_has_a_label_and_the_report_uses_it():
    labels = [distill.get(m).label for m in config.METHODS]
    assert len(set(labels)) == len(labels) and distill.get("fitnets").label == "FitNets"
    assert distill.get("crd").supports_ddp is False and distill.get("kd").supports_ddp is True


def test_readme_method_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| [^|]+ \|$", readme, flags=re.M)
    assert rows == list(config.METHODS)


def test_pipelines_name_registered_methods_and_models():
    quickstart = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["distill"]["matrix"]["method"]
    assert set(quickstart) <= set(config.METHODS)
    for name in ("cifar10", "cifar100"):
        p = config.load_params(ROOT / "pipelines" / name / "params.yaml")
        assert p.methods == list(config.METHODS)
    ci = (ROOT / ".ci/imagenet-smoke").read_text()
    assert "distill.get(" in ci and not re.search(r"for m in KD AT", ci)  # CI reads the methods' labels from the registry


def test_docs_model_table_is_the_registry():
    from kdpipe.models import resnet

    table = (ROOT / "docs/models.md").read_text().split("## Published teachers")[0]
    named = set(re.findall(r"`(\w+)`", table))
    # the CIFAR ResNets appear as a range, `resnet8` ... `resnet110`; every other model by name
    assert set(models.MODEL_NAMES) - set(resnet.DEPTHS) <= named
    assert {"resnet8", "resnet110"} <= named
    assert {models.FAMILY[m].__name__.rsplit(".", 1)[1] + ".py" for m in models.MODEL_NAMES} <= set(
        re.findall(r"`(\w+\.py)`", table))
