"""`kdpipe evaluate`: the collapse warning, and no Top-5 where there are 5 classes or fewer."""

import json

import torch
import yaml
from typer.testing import CliRunner

from kdpipe import checkpoint, engine, evaluate
from kdpipe.cli import app

from .conftest import tiny_params

METRIC_KEYS = ["top1", "top5", "top1_last", "best_epoch", "params_m", "epochs"]


def invoke(*args, code=0):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result


def test_a_model_collapsed_to_one_class_is_flagged_and_a_normal_one_is_not(workdir):
    invoke("data")
    invoke("student")
    normal = invoke("evaluate", "student")
    assert "warning" not in normal.output
    assert list(json.loads((workdir / "metrics/student.json").read_text())) == METRIC_KEYS  # unchanged

    ckpt = checkpoint.load_checkpoint(workdir / "models/student.pt")
    ckpt["state_dict"]["fc.weight"].zero_()  # every image gets the same logits: class 3 wins
    ckpt["state_dict"]["fc.bias"].copy_(torch.arange(10) == 3)
    checkpoint.atomic_save(ckpt, workdir / "models/flat.pt")
    log = json.loads((workdir / "logs/student.json").read_text())
    (workdir / "logs/flat.json").write_text(json.dumps({**log, "name": "flat"}))
    result = invoke("evaluate", "flat")
    classes = json.loads((workdir / "data/prepared/manifest.json").read_text())["classes"]
    line = f"warning: flat: predicts one class ({classes[3]!r}) for all 40 test images"
    assert result.stderr.strip() == line and "warning" not in result.stdout
    metrics = json.loads((workdir / "metrics/flat.json").read_text())
    assert metrics["warning"] == line.removeprefix("warning: flat: ")

    text = invoke("report", "student", "flat").stdout
    assert "| ResNet-8 (student) ⚠ |" in text and "| ResNet-8 (student) |" in text
    assert f"\n⚠ flat: {metrics['warning']}" in text and "⚠ student" not in text


def test_collapse_rule():
    balanced = [10, 10, 10, 10]
    assert evaluate.collapse({"predicted": [0, 40, 0, 0], "labels": balanced, "test_top1": 25.0}, list("abcd")) \
        == "predicts one class ('b') for all 40 test images"
    at_chance = {"predicted": [20, 20, 0, 0], "labels": [16, 8, 8, 8], "test_top1": 40.0}
    assert evaluate.collapse(at_chance, None).startswith("test Top-1 40.00% is at or below the majority-class rate "
                                                         "40.00%")
    assert evaluate.collapse({**at_chance, "test_top1": 42.5}, None) is None


def test_top5_only_above_5_classes():
    def logits_of(classes):
        model = torch.nn.Linear(classes, classes)
        y = torch.arange(8) % classes
        return engine.evaluate(model, [(torch.randn(8, classes), y)])

    assert "test_top5" not in logits_of(5) and "test_top5" not in logits_of(2)
    assert "test_top5" in logits_of(6)


def test_four_classes_have_no_top5_anywhere(workdir):
    p = tiny_params(data={"synthetic": {"num_classes": 4, "train_size": 48, "test_size": 20, "seed": 0}})
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    invoke("data")
    trained = invoke("student")
    assert "top5" not in trained.stderr and "test " in trained.stderr  # the per-epoch lines
    out = invoke("evaluate", "student").stdout
    assert "top5" not in out and "last top1" in out
    assert "top5" not in json.loads((workdir / "metrics/student.json").read_text())
    assert (workdir / "plots/student.csv").read_text().splitlines()[0] == \
        "epoch,lr,train_loss,train_top1,test_loss,test_top1,loss_ce"
    text = invoke("report", "student").stdout
    row = next(line for line in text.splitlines() if line.startswith("| ResNet-8 (student)"))
    assert row.split(" | ")[3] == "—"
