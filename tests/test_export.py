"""`kdpipe export`: ONNX (and TorchScript) with folded normalisation, checked against PyTorch."""

import json

import numpy as np
import onnx  # the `export` extra, part of the test install: a broken install fails here, never skips
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from kdpipe import checkpoint, engine, export
from kdpipe.cli import app


def invoke(*args, code=0):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture
def trained(workdir):
    invoke("data")
    invoke("student")
    invoke("teacher")
    return workdir


def reference_logits(workdir, name, x_uint8):
    """The model by hand: normalise uint8 pixels with the manifest's mean/std, run the checkpoint's model."""
    manifest = json.loads((workdir / "data/prepared/manifest.json").read_text())
    mean = torch.tensor(manifest["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(manifest["std"]).view(1, 3, 1, 1)
    model = checkpoint.restore_model(checkpoint.load_checkpoint(workdir / f"models/{name}.pt")).eval()
    with torch.no_grad():
        return model((x_uint8.float() / 255 - mean) / std)


def test_onnx_export_matches_pytorch_with_a_dynamic_batch(trained):
    out = invoke("export", "student")
    assert "student -> models/student.onnx: max |logit difference|" in out and "top-1 agreement 100.00%" in out
    proto = onnx.load(trained / "models/student.onnx")
    meta = {p.key: p.value for p in proto.metadata_props}
    assert "normalisation is folded" in meta["kdpipe.input"] and meta["kdpipe.model"] == "resnet8"
    assert meta["kdpipe.epoch"] == "2" and "kdpipe.top1" not in meta  # not evaluated: no accuracy to say
    # no absolute paths (the exporter's stack traces): the same bytes from any checkout folder
    data = (trained / "models/student.onnx").read_bytes()
    assert str(trained).encode() not in data and str(engine.__file__).rsplit("/", 2)[0].encode() not in data
    x = torch.from_numpy(np.load(trained / "data/prepared/test_x.npy")[:5])
    session = ort.InferenceSession(str(trained / "models/student.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # any batch size
        got = session.run(["logits"], {"image": (x[:n].float() / 255).numpy()})[0]
        np.testing.assert_allclose(got, reference_logits(trained, "student", x[:n]).numpy(), atol=1e-4, rtol=0)


def test_torchscript_export(trained):
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # torch's TorchScript deprecation notices stay quiet
        warnings.simplefilter("always")
        invoke("export", "student", "--format", "torchscript")
    assert not [w for w in caught if "torch.jit" in str(w.message)]
    x = torch.from_numpy(np.load(trained / "data/prepared/test_x.npy")[:4])
    module = torch.jit.load(str(trained / "models/student.torchscript.pt"))
    torch.testing.assert_close(module(x.float() / 255), reference_logits(trained, "student", x), atol=1e-5, rtol=0)


def test_best_of_several_runs(trained):
    for n in ("student", "teacher"):
        invoke("evaluate", n)
    top1 = {n: json.loads((trained / f"metrics/{n}.json").read_text())["top1_last"] for n in ("student", "teacher")}
    best = max(top1, key=top1.get)
    out = invoke("export", "student", "teacher", "--best", "--out", "models/best.onnx")
    assert out.startswith(f"{best} (highest last-epoch top1 {top1[best]:.2f}% of 2) -> models/best.onnx")
    assert invoke("export", "student", "teacher", code=2)  # several names need --best


def test_best_is_chosen_by_the_exported_weights_accuracy(trained):
    """The file holds the last epoch's weights: the best epoch's Top-1 (metrics' top1) says nothing of them."""
    for n, top1, last in (("student", 90.0, 20.0), ("teacher", 50.0, 40.0)):
        invoke("evaluate", n)
        f = trained / f"metrics/{n}.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "top1": top1, "top1_last": last}))
    out = invoke("export", "student", "teacher", "--best", "--out", "models/best.onnx")
    assert out.startswith("teacher (highest last-epoch top1 40.00% of 2) -> models/best.onnx")
    meta = {p.key: p.value for p in onnx.load(trained / "models/best.onnx").metadata_props}
    assert meta["kdpipe.checkpoint"] == "models/teacher.pt"
    assert meta["kdpipe.epoch"] == "2" and meta["kdpipe.top1"] == "40.00"  # the last of 2 epochs, its top1_last


def test_a_mismatch_beyond_tolerance_fails_and_leaves_nothing(trained, monkeypatch):
    monkeypatch.setattr(export, "TOLERANCE", 0.0)  # ONNX Runtime's kernels round differently from PyTorch's
    result = CliRunner().invoke(app, ["export", "student"])
    assert result.exit_code == 1 and "exported model differs from PyTorch by" in result.output
    assert not list((trained / "models").glob("*.onnx")) and not list((trained / "models").glob(".*tmp*"))


def test_missing_checkpoint_is_one_line(trained):
    result = CliRunner().invoke(app, ["export", "ghost"])
    assert result.exit_code == 1 and result.output.strip() == "error: models/ghost.pt: checkpoint not found"


def docs_preprocess(size, augment):
    """docs/export.md's preprocessing snippet, run as written (up to the session, which needs the file)."""
    from .conftest import ROOT

    text = (ROOT / "docs/export.md").read_text()
    code = text.split("```python\nimport numpy as np, onnxruntime")[1].split("```")[0]
    namespace = {}
    exec("import numpy as np, onnxruntime" + code.split("\nsession = ")[0], namespace)
    namespace.update(SIZE=size, AUGMENT=augment)
    return namespace["preprocess"], code.split("\nsession = ")[1]


@pytest.mark.parametrize("augment", ["imagenet", "cifar"])
def test_the_documented_preprocessing_is_kdpipes(workdir, photos, augment):
    import yaml

    from kdpipe import sources
    from kdpipe.runtime import Numerics

    from .conftest import tiny_params

    size = 32
    p = tiny_params(data={"dataset": "folder", "path": str(photos), "image_size": size, "augment": augment})
    (workdir / "params.yaml").write_text(yaml.safe_dump(p))
    invoke("data")
    preprocess, _ = docs_preprocess(size, augment)
    source = sources.open_source(workdir / "data/prepared", Numerics(torch.device("cpu"), False, False), 0)
    pixels = next(iter(source.test_pixels(100)))[0]
    files = sorted((photos / "test").rglob("*.*"))  # the test split in ImageFolder's order
    for i, f in enumerate(files):
        np.testing.assert_array_equal(preprocess(f), (pixels[i:i + 1].float() / 255).numpy())
    if augment == "imagenet":  # and the rest of the snippet on an exported model
        invoke("student")
        invoke("export", "student", "--out", "models/best-student.onnx")
        _, rest = docs_preprocess(size, augment)
        namespace = {"ort": ort, "preprocess": preprocess}
        exec("session = " + rest.replace('"cat.jpg"', repr(str(files[0]))), namespace)
        np.testing.assert_allclose(namespace["logits"], reference_logits(workdir, "student", pixels[:1]).numpy(),
                                   atol=1e-4, rtol=0)
