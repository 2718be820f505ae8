"""Compressing a real model on one's own images: a folder of photos of mixed sizes at 64 px, a torchvision
teacher (from a weights file, fine-tuned for the folder's classes) and a torchvision student, through every
stage of the CLI: data -> teacher -> student -> distill -> evaluate -> export (ONNX parity)."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from kdpipe import data

from .conftest import tiny_params
from .test_cli import invoke
from .test_gpu_paths import fp32_by_hand

TRAIN = {"epochs": 1, "batch_size": 6, "runtime": {"device": "cpu", "cpu_threads": 1}}


@pytest.mark.parametrize("source", ["memory", "stream"])
def test_photos_at_64px_with_torchvision_models(workdir, photos, source):
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), workdir / "resnet18-imagenet.pth")
    params = tiny_params(
        data={"dataset": "folder", "path": str(photos), "image_size": 64, "augment": "imagenet",
              "normalize": "imagenet", "source": source},
        teacher={**TRAIN, "model": "tv/resnet18", "weights": "resnet18-imagenet.pth"},  # relative: the params' folder
        student={**TRAIN, "model": "tv/mobilenet_v3_small"},
        evaluate={"batch_size": 64, "device": "cpu", "workers": 0})
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    invoke("data")
    out = invoke("teacher")
    assert "classifier replaced by a new one for 3 classes" in out
    invoke("student")
    invoke("distill", "--method", "kd")
    # the test photos by hand, from the files: decoded, the evaluation view (resize, centre crop), labelled by folder
    classes = data.read_manifest(workdir / "data/prepared").classes
    files = sorted((photos / "test").glob("*/*"))
    x = torch.stack([data.test_view(data.read_image(str(f)), 64, "imagenet") for f in files])
    y = torch.tensor([classes.index(f.parent.name) for f in files])
    for name in ("teacher", "student", "kd"):
        invoke("evaluate", name)
        m = json.loads((workdir / f"metrics/{name}.json").read_text())
        history = torch.load(workdir / f"models/{name}.pt", weights_only=True)["history"]
        loss, top1 = fp32_by_hand(workdir / f"models/{name}.pt", x, y)
        # `kdpipe evaluate` and the training's test evaluation of its one epoch are of the checkpoint's model, fp32:
        # the Top-1 computed by hand, the loss too up to fp32 rounding (another memory layout and summation order:
        # measured <= 5e-8 relative)
        assert m["epochs"] == 1 and m["top1"] == m["top1_last"] == round(top1, 2) == round(history[0]["test_top1"], 2)
        assert history[0]["test_loss"] == pytest.approx(loss, rel=1e-6, abs=0)
    ckpt = torch.load(workdir / "models/teacher.pt", weights_only=True)
    assert ckpt["model"] == "tv/resnet18" and ckpt["state_dict"]["fc.weight"].shape == (3, 512)
    assert ckpt["config"]["weights"].endswith("resnet18-imagenet.pth")
    invoke("report", "teacher", "student", "kd")
    table = (workdir / "reports/adhoc/results.md").read_text()
    # a run whose model collapsed to one class (likely after one epoch on 18 images) is marked ⚠
    assert re.search(r"\| tv/resnet18 \(teacher\)( ⚠)? \| 11\.18 \|", table)
    assert re.search(r"\| tv/mobilenet_v3_small \(kd\)( ⚠)? \| 1\.52 \|", table)
    out = invoke("export", "kd")
    assert "top-1 agreement 100.00% on 9 test images" in out
    import onnx

    shape = onnx.load(str(workdir / "models/kd.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in shape[1:]] == [3, 64, 64]


def test_import_teacher_takes_a_torchvision_state_dict(workdir, photos):
    import torchvision
    from typer.testing import CliRunner

    from kdpipe.cli import app

    params = tiny_params(data={"dataset": "folder", "path": str(photos), "image_size": 48},
                         evaluate={"batch_size": 64, "device": "cpu", "workers": 0})
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    invoke("data")
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=3)
    torch.save(source.state_dict(), workdir / "mine.pth")
    out = invoke("import-teacher", "mine.pth", "--model", "tv/resnet18", "--data", "data/prepared", "--name", "teacher")
    assert "tv/resnet18, 3 classes, 11.18M params" in out
    invoke("evaluate", "teacher")
    ckpt = torch.load(workdir / "models/teacher.pt", weights_only=True)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in ckpt["state_dict"].items())
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), workdir / "imagenet.pth")
    result = CliRunner().invoke(app, ["import-teacher", "imagenet.pth", "--model", "tv/resnet18", "--data",
                                      "data/prepared", "--name", "other"])
    assert result.exit_code == 1 and "fc.weight has shape (1000, 512), but tv/resnet18 for 3 classes" in result.output
    assert not (workdir / "models/other.pt").exists()


def test_import_teacher_takes_torchvision_weights_by_name(workdir, photos, monkeypatch):
    """The ImageNet tables' teachers are torchvision's IMAGENET1K_V1 weights, used as they are: imported by
    name through torch.hub's cache (filled here with a stand-in file, named by its own hash as torchvision names
    its files, the weights' URL pointed at it: no download)."""
    import hashlib

    import torchvision
    from typer.testing import CliRunner

    from kdpipe.cli import app
    from kdpipe.import_teacher import import_teacher

    monkeypatch.setenv("TORCH_HOME", str(workdir / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # torch.hub re-reads TORCH_HOME
    cached = workdir / "torch/hub/checkpoints/stand-in.pth"
    cached.parent.mkdir(parents=True)
    torch.manual_seed(1)
    stand_in = torchvision.models.resnet18().state_dict()
    torch.save(stand_in, cached)
    cached = cached.rename(cached.with_name(f"resnet18-{hashlib.sha256(cached.read_bytes()).hexdigest()[:8]}.pth"))
    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.value, "url", f"http://127.0.0.1:9/{cached.name}")
    norm = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    ckpt = import_teacher(Path("IMAGENET1K_V1"), "tv/resnet18", 1000, workdir / "models/t.pt", "imagenet", norm)
    assert all(torch.equal(v, stand_in[k]) for k, v in ckpt["state_dict"].items())
    assert ckpt["meta"]["imported"]["file"] == "IMAGENET1K_V1" and len(ckpt["meta"]["imported"]["sha256"]) == 64
    (workdir / "params.yaml").write_text(yaml.safe_dump(tiny_params(data={"dataset": "folder", "path": str(photos)})))
    invoke("data")
    result = CliRunner().invoke(app, ["import-teacher", "IMAGENET1K_V1", "--model", "tv/resnet18", "--data",
                                      "data/prepared", "--name", "teacher"])
    assert result.exit_code == 1 and result.output.strip() == \
        "error: tv/resnet18 IMAGENET1K_V1: weights for 1000 classes, but the data has 3"

