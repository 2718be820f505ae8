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
    assert manifest.classes == ["a_dog", "b_cat"]  # sorted folder names, as ImageFolder
    assert manifest.class_counts == {"train": {"a_dog": 2, "b_cat": 2}, "test": {"a_dog": 2, "b_cat": 2}}
    assert manifest.source == str(root) and manifest.resized == 0
    # pixel-exact against PIL, channel-first
    first = np.asarray(Image.open(root / "train" / "a_dog" / "0.png").convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(p.train.x[0].numpy(), first) and p.train.y.tolist() == [0, 0, 1, 1]


def test_other_sizes_are_resized_and_counted(tmp_path, capsys):
    root = make_folder(tmp_path / "ds", sizes=((32, 32), (64, 48)))
    manifest = prepare(root, tmp_path / "out")
    assert manifest.resized == 4 and "resized 4 images to 32x32" in capsys.readouterr().err
    big = Image.open(root / "train" / "a_dog" / "1.png").convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
    assert np.array_equal(data.load(tmp_path / "out").train.x[1].numpy(), np.asarray(big).transpose(2, 0, 1))


def test_files_that_are_not_images_are_counted(tmp_path, capsys):
    root = make_folder(tmp_path / "ds")
    (root / "train" / "a_dog" / "notes.txt").write_text("x")
    (root / "train" / "b_cat" / "Thumbs.db").write_bytes(b"x")
    manifest = prepare(root, tmp_path / "out")
    assert manifest.class_counts["train"] == {"a_dog": 1, "b_cat": 1}
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
    assert manifest.classes[:3] == ["airplane", "automobile", "bird"] and manifest.num_classes == 10
    assert (manifest.train_size, manifest.test_size, manifest.resized) == (5000, 1000, 0)
    assert set(manifest.class_counts["train"].values()) == {500}
    p = data.load(tmp_path / "out")
    path = REAL / "test" / "truck" / "0099.jpg"  # the last test image, decoded by PIL
    assert np.array_equal(p.test.x[-1].numpy(), np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1))
    assert p.test.y[-1].item() == 9
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["source"] == str(REAL)


# ---- data.source: stream: every file decoded once by `kdpipe data`; a worker's error is one line ----

def jpeg_folder(root: Path, n: int = 3, classes=("a_dog", "b_cat")) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    return root


def stream(root, out, **updates):
    return prepare_data(config.Data(dataset="folder", path=str(root), source="stream", **updates), out)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_stream_decodes_every_file_at_data_time(tmp_path):
    root = jpeg_folder(tmp_path / "ds")
    bad = root / "test" / "b_cat" / "2.jpg"
    truncate(bad)  # a header PIL opens (and `verify` passes): only decoding finds the missing half
    with pytest.raises(data.DataError, match=f"^{bad}: not a readable image .*truncated") as e:
        stream(root, tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_file_damaged_after_kdpipe_data_is_one_line_from_the_workers(tmp_path, damage):
    from kdpipe import sources
    from kdpipe.runtime import Numerics

    import torch

    root = jpeg_folder(tmp_path / "ds")
    stream(root, tmp_path / "out")
    bad = root / "train" / "b_cat" / "1.jpg"
    if damage == "delete":
        bad.unlink()
    else:  # the same size, so the listing's size check passes: decoding fails in a worker
        bad.write_bytes(bad.read_bytes()[:100].ljust(bad.stat().st_size, b"\0"))
    source = sources.open_source(tmp_path / "out", Numerics(torch.device("cpu"), False, False), workers=2)
    with pytest.raises(data.DataError) as e:
        list(source.epoch(torch.Generator().manual_seed(0), 4))
    assert str(e.value).startswith(f"{bad}: ") and "\n" not in str(e.value)


def test_skipped_files_are_named(tmp_path, capsys):
    root = jpeg_folder(tmp_path / "ds")
    (root / "train" / "a_dog" / "notes.txt").write_text("x")
    (root / "train" / "b_cat" / ".DS_Store").write_bytes(b"x")
    (root / "train" / "stray.jpg").write_bytes(b"x")  # not in a class folder: ImageFolder does not list it
    manifest = stream(root, tmp_path / "out")
    assert manifest.train_size == 6
    assert f"{root / 'train'}: skipped 3 files that are not images in class folders: a_dog/notes.txt, " \
           "b_cat/.DS_Store, stray.jpg (image extensions: .jpg" in capsys.readouterr().err


def test_a_val_folder_without_test_gets_a_hint(tmp_path):
    root = jpeg_folder(tmp_path / "ds")
    (root / "test").rename(root / "val")
    for prep in (prepare, stream):
        with pytest.raises(data.DataError, match=r"ds/test: .*; found val/: rename it to test/ or use dataset: "
                                                 r"imagenet$"):
            prep(root, tmp_path / "out")
