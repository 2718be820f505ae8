"""Data at any resolution: `data.fit`, the stream source's determinism (worker count, resume), and the memory/stream parity."""

import pytest
import torch

from kdpipe import config, data, sources
from kdpipe.prepare import IMAGENET_MEAN, prepare
from kdpipe.runtime import Ranks, Numerics

from .conftest import tiny_params

CPU = Numerics(torch.device("cpu"), False, False)


def folder_data(path, **updates) -> config.Data:
    return config.validate(tiny_params(data={"dataset": "folder", "path": str(path), **updates})).data


def test_fit_conventions(photos):
    x = data.read_image(str(next((photos / "train" / "cat").glob("*.jpg"))))
    assert data.fit(x, 64, "cifar").shape == (3, 64, 64)
    assert data.fit(x, 64, "imagenet").shape == (3, 73, 73)  # round(64 / 0.875): the evaluation's resize
    x32 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert data.fit(x32, 32, "cifar") is x32  # CIFAR's own size: untouched (the quickstart's bytes)


def test_folder_at_image_size_is_not_squeezed_to_32(tmp_path, photos):
    m = prepare(folder_data(photos, image_size=48), tmp_path / "p")
    prepared = data.load(tmp_path / "p")
    assert prepared.train.x.shape == (18, 3, 48, 48) and m.image_size == 48 and m.resized == 27
    m = prepare(folder_data(photos, image_size=48, augment="imagenet", normalize="imagenet"), tmp_path / "q")
    src = sources.open_source(tmp_path / "q", CPU)
    assert data.load(tmp_path / "q").train.x.shape[-1] == 55 and m.mean == IMAGENET_MEAN
    _, x, y, idx = next(src.epoch(torch.Generator().manual_seed(0), 8))
    assert x.shape == (8, 3, 48, 48) and next(src.test(5))[0].shape == (5, 3, 48, 48)


def test_stream_source_is_independent_of_workers_and_resumes(tmp_path, photos):
    prepare(folder_data(photos, image_size=40, augment="imagenet", source="stream"), tmp_path / "s")
    assert not list((tmp_path / "s").glob("*.npy"))  # nothing decoded up front

    def two_epochs(workers, state=None):
        src = sources.open_source(tmp_path / "s", CPU, workers)
        g = torch.Generator().manual_seed(0)
        if state is not None:
            g.set_state(state)
        return [[(x, y, i) for _, x, y, i in src.epoch(g, 8)] for _ in range(2)], g

    (e1, e2), _ = two_epochs(0)
    (f1, f2), _ = two_epochs(2)
    for a, b in zip(e1 + e2, f1 + f2):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    g = torch.Generator().manual_seed(0)
    list(sources.open_source(tmp_path / "s", CPU, 0).epoch(g, 8))  # epoch 1, then "resume" at its end
    (r2, _), _ = two_epochs(0, g.get_state())
    assert all(torch.equal(u, v) for a, b in zip(e2, r2) for u, v in zip(a, b))
    assert not torch.equal(e1[0][0][:4], e2[0][0][:4])  # epochs differ


@pytest.mark.parametrize("augment", ["cifar", "imagenet"])
def test_stream_and_memory_see_the_same_images_at_the_evaluation_view(tmp_path, photos, augment):
    # each split in its order, unaugmented (evaluation; WKD's cost over the training set), decoded by 2 workers
    prepare(folder_data(photos, image_size=40, augment=augment), tmp_path / "m")
    prepare(folder_data(photos, image_size=40, augment=augment, source="stream"), tmp_path / "s")
    mem, stream = sources.open_source(tmp_path / "m", CPU, 0), sources.open_source(tmp_path / "s", CPU, 2)
    assert mem.manifest.mean == pytest.approx(stream.manifest.mean, abs=1e-3)  # all 18 train images seen
    for split, n in (("train", 18), ("test", len(stream.splits["test"]))):
        seen = 0
        for (a, y), (b, z) in zip(mem.pixels(split, 4), stream.pixels(split, 4)):
            assert a.dtype == torch.uint8 and torch.equal(a, b) and torch.equal(y, z)
            seen += len(y)
        assert seen == n
    assert torch.equal(next(stream.pixels("train", 4))[0], mem.train_pixels([0, 1, 2, 3]))


@pytest.mark.parametrize("augment", ["cifar", "imagenet"])
def test_stream_and_memory_give_the_same_calibration_images(tmp_path, photos, augment):
    # `kdpipe quantize` calibrates on training images at the evaluation view: the same pixels from either source
    prepare(folder_data(photos, image_size=40, augment=augment), tmp_path / "m")
    prepare(folder_data(photos, image_size=40, augment=augment, source="stream"), tmp_path / "s")
    mem, stream = (sources.open_source(tmp_path / d, CPU, 0) for d in ("m", "s"))
    idx = [0, 5, 7, 17]
    a, b = mem.train_pixels(idx), stream.train_pixels(idx)
    assert a.shape == (4, 3, 40, 40) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert torch.equal(mem.train_labels[idx], stream.train_labels[idx])
    train = stream.splits["train"]
    assert torch.equal(a[1], data.test_view(data.read_image(train.paths[5]), 40, augment))


def test_stream_shards_per_rank(tmp_path, photos):
    prepare(folder_data(photos, image_size=32, source="stream"), tmp_path / "s")
    src = sources.open_source(tmp_path / "s", CPU, 0)
    single = [i for _, _, _, i in src.epoch(torch.Generator().manual_seed(0), 8)]
    ranks = [[i for _, _, _, i in src.epoch(torch.Generator().manual_seed(0), 8, Ranks(r, 2))] for r in (0, 1)]
    for whole, a, b in zip(single, *ranks):
        assert torch.equal(whole[:len(a) * 2:2], a) and torch.equal(whole[1:len(b) * 2:2], b)


def test_stream_refuses_a_changed_file(tmp_path, photos):
    prepare(folder_data(photos, image_size=32, source="stream"), tmp_path / "s")
    victim = sorted((photos / "test" / "cat").glob("*"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0" * 10)
    with pytest.raises(data.DataError, match="changed since `kdpipe data` listed it"):
        list(sources.open_source(tmp_path / "s", CPU, 0).test(100))


def test_stream_needs_a_folder():
    with pytest.raises(config.ParamsError, match="source: stream reads image files"):
        config.validate(tiny_params(data={"source": "stream"}))


@pytest.fixture
def ilsvrc(tmp_path, photos):
    """An ImageNet-shaped folder (train/<wnid>/, val/<wnid>/) of a few classes: the photos under ILSVRC's split names."""
    root = tmp_path / "ilsvrc"
    root.mkdir()
    (root / "train").symlink_to(photos / "train")
    (root / "val").symlink_to(photos / "test")
    return root


def test_imagenet_checks_ilsvrc2012s_counts(tmp_path, ilsvrc):
    cfg = folder_data(ilsvrc, dataset="imagenet", source="stream", augment="imagenet", image_size=32)
    n_train = sum(1 for f in (ilsvrc / "train").rglob("*") if f.is_file())
    n_classes = len([d for d in (ilsvrc / "train").iterdir() if d.is_dir()])
    with pytest.raises(data.DataError, match=rf"not the whole ILSVRC2012: {n_classes} classes \(ILSVRC2012: 1,000\), "
                                             rf"{n_train:,} train images \(ILSVRC2012: 1,281,167\), .* val images "
                                             r"\(ILSVRC2012: 50,000\); set data.subset: true"):
        prepare(cfg, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "prepared.tmp").exists()
    manifest = prepare(cfg.model_copy(update={"subset": True}), tmp_path / "prepared")  # val/ is the test split
    assert (manifest.dataset, manifest.train_size, manifest.num_classes) == ("imagenet", n_train, n_classes)
    assert manifest.test_size == sum(1 for f in (ilsvrc / "val").rglob("*") if f.is_file())
    assert manifest.sha256.keys() == {"samples"}  # a hash of the file list; nothing decoded up front


@pytest.mark.parametrize("updates, message", [
    ({"dataset": "imagenet", "path": "x", "source": "memory"}, "dataset: imagenet is read from its files"),
    ({"dataset": "imagenet", "source": "stream"}, "path is required for dataset: folder and imagenet"),
    ({"dataset": "folder", "path": "x", "subset": True}, "subset is for dataset: imagenet"),
])
def test_imagenet_params_errors(updates, message):
    with pytest.raises(config.ParamsError, match=message):
        config.validate(tiny_params(data=updates))


def test_lr_scales_with_the_global_batch():
    # ImageNet recipes: lr 0.1 per 256 images; at batch 512 that is 0.2 (mdistiller's KD/DKD configs), at 1024 0.4
    cfg = config.Train(batch_size=512, optim=config.Optim(lr=0.1, lr_batch=256))
    assert cfg.lr == pytest.approx(0.2)
    assert cfg.model_copy(update={"batch_size": 1024}).lr == pytest.approx(0.4)
    assert config.Train(batch_size=512, optim=config.Optim(lr=0.1)).lr == 0.1  # lr_batch null: as it is


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_sizes_are_the_batch_sizes_an_epoch_yields(world):
    # torch.compile's warm-up compiles exactly these sizes: every size `batches` yields to a rank, full one first
    for n in (5, 16, 96, 100, 101, 130):
        for batch_size in (6, 16, 48):
            if batch_size % world:
                continue
            g = torch.Generator().manual_seed(0)
            yielded = [len(idx) // world for _, idx in sources.batches(n, batch_size, g, Ranks(0, world, 0))]
            expected = sources.shard_sizes(n, batch_size, Ranks(0, world, 0))
            # none left to compile inside an epoch, none compiled in vain; the first batch's size first
            assert set(yielded) == set(expected) and yielded[:1] == expected[:1], (n, batch_size)
