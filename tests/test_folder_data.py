"""`data.dataset: folder`: an image-folder dataset (train/<class>/*, test/<class>/*) as prepared arrays."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kdpipe import config, data
from kdpipe.cli import app
from kdpipe.prepare import prepare as prepare_data

from .conftest import ROOT, tiny_params, write_params

REAL = ROOT.parent / "shared" / "data" / "cifar10-jpeg-mini"


def make_folder(root: Path, sizes=((32, 32),), classes=("b_cat", "a_dog")):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i, size in enumerate(sizes):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


def prepare(root, out):
    return prepare_data(config.Data(dataset="folder", path=str(root)), out)


def test_pixels_labels_and_manifest(tmp_path):
    root = make_folder(tmp_path / "ds", sizes=((32, 32), (32, 32)))
    manifest = prepare(root, tmp_path / "out")
    p = data.load(tmp_path / "out")
    assert manifest["classes"] == ["a_dog", "b_cat"]  # sorted folder names, as ImageFolder
    assert manifest["class_counts"] == {"train": {"a_dog": 2, "b_cat": 2}, "test": {"a_dog": 2, "b_cat": 2}}
    assert manifest["source"] == str(root) and manifest["resized"] == 0
    # pixel-exact against PIL, channel-first
    first = np.asarray(Image.open(root / "train" / "a_dog" / "0.png").convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(p.train.x[0].numpy(), first) and p.train.y.tolist() == [0, 0, 1, 1]


def test_other_sizes_are_resized_and_counted(tmp_path, capsys):
    root = make_folder(tmp_path / "ds", sizes=((32, 32), (64, 48)))
    manifest = prepare(root, tmp_path / "out")
    assert manifest["resized"] == 4 and "resized 4 images to 32x32" in capsys.readouterr().err
    big = Image.open(root / "train" / "a_dog" / "1.png").convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
    assert np.array_equal(data.load(tmp_path / "out").train.x[1].numpy(), np.asarray(big).transpose(2, 0, 1))


def test_files_that_are_not_images_are_counted(tmp_path, capsys):
    root = make_folder(tmp_path / "ds")
    (root / "train" / "a_dog" / "notes.txt").write_text("x")
    (root / "train" / "b_cat" / "Thumbs.db").write_bytes(b"x")
    manifest = prepare(root, tmp_path / "out")
    assert manifest["class_counts"]["train"] == {"a_dog": 1, "b_cat": 1}
    assert f"{root / 'train'}: skipped 2 files that are not images" in capsys.readouterr().err


def test_corrupt_image_names_the_file_and_writes_nothing(tmp_path):
    root = make_folder(tmp_path / "ds")
    bad = root / "test" / "b_cat" / "9.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(data.DataError, match=f"{bad}: not a readable image"):
        prepare(root, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_mismatched_classes_and_missing_folder(tmp_path):
    root = make_folder(tmp_path / "ds")
    (root / "test" / "c_owl").mkdir()
    Image.new("RGB", (32, 32)).save(root / "test" / "c_owl" / "0.png")
    with pytest.raises(data.DataError, match=r"class folders differ from train's: not in train \['c_owl'\]"):
        prepare(root, tmp_path / "out")
    (root / "test" / "c_owl" / "0.png").unlink()
    (root / "test" / "c_owl").rmdir()
    (root / "test" / "a_dog" / "0.png").unlink()
    (root / "test" / "a_dog").rmdir()
    with pytest.raises(data.DataError, match=r"test: its class folders differ from train's: missing \['a_dog'\]$"):
        prepare(root, tmp_path / "out")
    with pytest.raises(data.DataError, match="dataset folder not found"):
        prepare(tmp_path / "nope", tmp_path / "out")


def test_params_need_a_path_for_folder_datasets(workdir):
    write_params(workdir / "params.yaml", tiny_params(data={"dataset": "folder"}))
    result = CliRunner().invoke(app, ["data"])
    assert result.exit_code == 2 and "path is required for dataset: folder" in result.output


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/cifar10-jpeg-mini is not on this machine")
def test_real_cifar10_jpegs(tmp_path):
    manifest = prepare(REAL, tmp_path / "out")
    assert manifest["classes"][:3] == ["airplane", "automobile", "bird"] and manifest["num_classes"] == 10
    assert (manifest["train_size"], manifest["test_size"], manifest["resized"]) == (5000, 1000, 0)
    assert set(manifest["class_counts"]["train"].values()) == {500}
    p = data.load(tmp_path / "out")
    path = REAL / "test" / "truck" / "0099.jpg"  # the last test image, decoded by PIL
    assert np.array_equal(p.test.x[-1].numpy(), np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1))
    assert p.test.y[-1].item() == 9
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["source"] == str(REAL)
