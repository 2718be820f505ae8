"""`kdpipe import-teacher`: published checkpoints in RepDistiller's layout become kdpipe checkpoints whose
model gives the source model's outputs; bad files are one-line errors (exit 2) that write nothing."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import kdpipe
from kdpipe import models
from kdpipe.cli import app
from kdpipe.sources import renormalisation
from kdpipe.import_teacher import to_reference

# one model per family (resnet56: the family kdpipe renames keys for)
FAMILY_MODELS = ["resnet56", "resnet8x4", "wrn_16_1", "vgg8", "mobilenetv2", "shufflev1", "shufflev2", "resnet50"]


def reference_checkpoint(name: str, num_classes: int, path: Path, seed: int = 0, dataparallel=False) -> torch.nn.Module:
    """A model with random weights and BN statistics, saved as RepDistiller saves `ckpt_epoch_240.pth`, with
    RepDistiller's key names (kdpipe's renames undone)."""
    torch.manual_seed(seed)
    model = models.create(name, num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial eval-mode BN
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    sd = to_reference(name, model.state_dict())
    if dataparallel:
        sd = {f"module.{k}": v for k, v in sd.items()}
    torch.save({"model": sd, "epoch": 240, "accuracy": 71.5,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005, "params": [0, 1]}]}}, path)
    return model.eval()




def run(*args):
    return CliRunner().invoke(app, ["import-teacher", *map(str, args)])


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_imported_model_gives_the_source_outputs(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    source = reference_checkpoint(name, 100, tmp_path / "ckpt_epoch_240.pth", dataparallel=name == "vgg8")
    result = run(tmp_path / "ckpt_epoch_240.pth", "--model", name, "--dataset", "cifar100", "--name", "t")
    assert result.exit_code == 0, result.output
    assert "source accuracy 71.50%" in result.output
    model = kdpipe.load_model("models/t.pt")
    assert not model.training
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=1e-5)
    ckpt = torch.load("models/t.pt", weights_only=True)
    import hashlib
    assert ckpt["meta"]["imported"] == {"file": "ckpt_epoch_240.pth", "epoch": 240, "accuracy": 71.5,
                                        "sha256": hashlib.sha256((tmp_path / "ckpt_epoch_240.pth").read_bytes()).hexdigest()}
    assert ckpt["normalization"]["mean"] == [0.5071, 0.4867, 0.4408]  # RepDistiller's CIFAR-100 constants


def test_bare_state_dict_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = reference_checkpoint("resnet20", 10, tmp_path / "full.pth")
    torch.save(torch.load(tmp_path / "full.pth", weights_only=True)["model"], tmp_path / "bare.pth")
    assert run(tmp_path / "bare.pth", "--model", "resnet20", "--num-classes", 10, "--name", "t",
               "--dataset", "synthetic", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25").exit_code == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(kdpipe.load_model("models/t.pt")(x), source(x), rtol=0, atol=1e-5)


class NotWeights:
    pass


C10 = ["--dataset", "cifar10", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"]


# exit 1: the file is wrong (unreadable, another model); exit 2: the options are (the convention of every command)
@pytest.mark.parametrize("case, args, message, code", [
    ("wrn", ["--model", "resnet56", "--dataset", "cifar100"], "not a resnet56 checkpoint (unexpected keys", 1),
    ("wrn", ["--model", "wrn_16_1", "--num-classes", 10, *C10],
     "fc.weight has shape (100, 64), wrn_16_1 with 10 classes needs (10, 64) (a model for 100 classes?)", 1),
    ("wrn", ["--model", "wrn_16_2", "--dataset", "cifar100"],
     "not a wrn_16_2 checkpoint (missing keys block1.layer.0.convShortcut.weight)", 1),
    ("garbage", ["--model", "wrn_16_1", "--dataset", "cifar100"], "not a readable checkpoint", 1),
    ("pickle", ["--model", "wrn_16_1", "--dataset", "cifar100"], "not a readable checkpoint", 1),
    ("missing", ["--model", "wrn_16_1", "--dataset", "cifar100"], "checkpoint not found", 1),
    ("wrn", ["--model", "resnet21", "--dataset", "cifar100"], "--model: unknown model 'resnet21'", 2),
    ("wrn", ["--model", "wrn_16_1", "--dataset", "cifar10"], "no reference normalisation known", 2),
    # the dataset decides the teacher's input normalisation: never guessed
    ("wrn", ["--model", "wrn_16_1", "--num-classes", 10], "give --dataset", 2),
    ("wrn", ["--model", "wrn_16_1", "--dataset", "cifar100", "--num-classes", 10], "--num-classes 10 but cifar100 has 100 classes", 2),
])
def test_bad_checkpoints_are_one_line_errors(tmp_path, monkeypatch, case, args, message, code):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "ckpt.pth"
    if case == "wrn":
        reference_checkpoint("wrn_16_1", 100, path)
    elif case == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif case == "pickle":  # a pickle that would run code on load: weights_only refuses it
        torch.save({"model": NotWeights()}, path)
    result = run(path, *args, "--name", "t")
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not Path("models/t.pt").exists() and not any(Path(".").glob("models/.*tmp*"))


def test_renormalisation_feeds_the_teacher_its_own_statistics():
    manifest = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    teacher = {"mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]}
    raw = torch.rand(2, 3, 4, 4)
    view = (1, 3, 1, 1)
    x_data = (raw - torch.tensor(manifest["mean"]).view(view)) / torch.tensor(manifest["std"]).view(view)
    x_teacher = (raw - torch.tensor(teacher["mean"]).view(view)) / torch.tensor(teacher["std"]).view(view)
    scale, shift = renormalisation(manifest, teacher, "cpu")
    torch.testing.assert_close(x_data * scale + shift, x_teacher)
    assert renormalisation(manifest, dict(manifest), "cpu") is None


def test_distill_and_evaluate_take_an_imported_teacher(workdir):
    runner = CliRunner()
    assert runner.invoke(app, ["data"]).exit_code == 0
    manifest = json.loads(Path("data/prepared/manifest.json").read_text())
    reference_checkpoint("resnet14", 10, workdir / "published.pth")
    common = ["--model", "resnet14", "--num-classes", "10", "--name", "teacher"]
    wrong = runner.invoke(app, ["import-teacher", "published.pth", *common, *C10])
    assert wrong.exit_code == 0  # importing is fine; distilling on another dataset is not
    r = runner.invoke(app, ["distill", "--method", "kd"])
    assert r.exit_code == 1 and "an imported cifar10 teacher, but data/prepared holds synthetic" in r.output
    mean, std = (",".join(map(str, manifest[k])) for k in ("mean", "std"))
    assert runner.invoke(app, ["import-teacher", "published.pth", *common, "--dataset", "synthetic",
                               "--mean", mean, "--std", std]).exit_code == 0
    r = runner.invoke(app, ["distill", "--method", "kd"])
    assert r.exit_code == 0, r.output
    assert "imported teacher resnet14 (published.pth" in r.output and "checked the dataset name (synthetic)" in r.output
    r = runner.invoke(app, ["evaluate", "teacher"])
    assert r.exit_code == 0, r.output
    m = json.loads(Path("metrics/teacher.json").read_text())
    assert m["top1"] == m["top1_last"] and m["best_epoch"] == m["epochs"] == 240


def test_import_with_prepared_data_takes_its_dataset_and_classes(workdir):
    runner = CliRunner()
    assert runner.invoke(app, ["data"]).exit_code == 0
    reference_checkpoint("resnet14", 10, workdir / "published.pth")
    r = runner.invoke(app, ["import-teacher", "published.pth", "--model", "resnet14", "--data", "data/prepared",
                            "--name", "teacher"])
    assert r.exit_code == 0, r.output
    ckpt = torch.load("models/teacher.pt", weights_only=True)
    manifest = json.loads(Path("data/prepared/manifest.json").read_text())
    assert (ckpt["dataset"], ckpt["num_classes"]) == ("synthetic", 10)
    # no reference constants for this dataset: the prepared data's own statistics
    assert ckpt["normalization"] == {"mean": manifest["mean"], "std": manifest["std"]}
    r = runner.invoke(app, ["import-teacher", "published.pth", "--model", "resnet14", "--data", "data/prepared",
                            "--num-classes", "100", "--name", "other"])
    assert r.exit_code == 2 and "--num-classes 100 but data/prepared holds 10" in r.output
    assert not Path("models/other.pt").exists()


def test_na_ok_records_a_method_the_pair_does_not_admit(workdir):
    runner = CliRunner()
    assert runner.invoke(app, ["data"]).exit_code == 0
    reference_checkpoint("resnet14", 10, workdir / "published.pth")
    assert runner.invoke(app, ["import-teacher", "published.pth", "--model", "resnet14", "--data", "data/prepared",
                               "--name", "teacher"]).exit_code == 0
    r = runner.invoke(app, ["distill", "--method", "fsp", "--model", "vgg8"])
    assert r.exit_code == 2 and "fsp pairs stages one to one, but the student has 5 feature taps" in r.output
    assert not Path("models/fsp.pt").exists()
    r = runner.invoke(app, ["distill", "--method", "fsp", "--model", "vgg8", "--na-ok"])
    assert r.exit_code == 0 and "fsp: not applicable: fsp pairs stages one to one" in r.output
    assert runner.invoke(app, ["evaluate", "fsp"]).exit_code == 0
    assert "not_applicable" in json.loads(Path("metrics/fsp.json").read_text())
    r = runner.invoke(app, ["export", "fsp"])
    assert r.exit_code == 1 and "holds no model (not applicable" in r.output


def test_an_accuracy_saved_as_a_tensor_is_read(tmp_path, monkeypatch):
    # RepDistiller saves `accuracy` as a 0-dim tensor
    monkeypatch.chdir(tmp_path)
    reference_checkpoint("resnet20", 100, tmp_path / "ckpt.pth")
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    ckpt["accuracy"], ckpt["epoch"] = torch.tensor(69.25), torch.tensor(240)
    torch.save(ckpt, tmp_path / "ckpt.pth")
    result = run(tmp_path / "ckpt.pth", "--model", "resnet20", "--dataset", "cifar100", "--name", "t")
    assert result.exit_code == 0 and "source accuracy 69.25%" in result.output, result.output
    imported = torch.load("models/t.pt", weights_only=True)["meta"]["imported"]
    assert (imported["accuracy"], imported["epoch"]) == (69.25, 240)
