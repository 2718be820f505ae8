"""`kdpipe data`: fetch CIFAR, read an image folder or draw the embedded synthetic set, at `data.image_size`,
into the prepared folder kdpipe/data.py describes and reads. `data.dataset: imagenet` is an image folder with
ILSVRC2012's split names (train/, val/: the test split) and counts, checked unless `data.subset`.
Everything is written to a temporary folder first and renamed into place, so a failure leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import synthetic
from .config import FOLDER_DATASETS, Manifest
from .data import ARRAYS, DataError, file_sha256, fit, read_image, stored_size, test_view

MIRROR_ENV = "KDPIPE_CIFAR_MIRROR"


@dataclass(frozen=True)
class Archive:
    filename: str
    md5: str
    folder: str  # top folder inside the tarball
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: bytes
    names_key: bytes


CIFAR = {
    "cifar10": Archive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
                       tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                       b"labels", b"label_names"),
    "cifar100": Archive("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
                        ("train",), "test", "meta", b"fine_labels", b"fine_label_names"),
}
OFFICIAL_MIRROR = "https://www.cs.toronto.edu/~kriz/"


def mirror_url(mirror: str | None) -> str:
    base = os.environ.get(MIRROR_ENV) or mirror or OFFICIAL_MIRROR
    return base if base.endswith("/") else base + "/"


def download(dataset: str, raw_dir: Path, mirror: str | None = None) -> Path:
    """Download the archive with torchvision (skipped when a verified copy exists); md5-checked."""
    from torchvision.datasets.utils import check_integrity, download_url

    spec = CIFAR[dataset]
    path = raw_dir / spec.filename
    if check_integrity(str(path), spec.md5):
        return path
    url = mirror_url(mirror) + spec.filename
    path.unlink(missing_ok=True)
    try:
        download_url(url, str(raw_dir), spec.filename, md5=None)
    except Exception as e:  # network errors, 404s, refused connections
        path.unlink(missing_ok=True)
        raise DataError(f"{dataset}: download of {url} failed: {e} (offline or behind a firewall? point "
                        f"data.mirror or {MIRROR_ENV} to a base URL serving {spec.filename})") from None
    if not check_integrity(str(path), spec.md5):
        got = hashlib.md5(path.read_bytes()).hexdigest()
        path.unlink()
        raise DataError(f"{dataset}: archive from {url} is corrupt (md5 {got}, expected {spec.md5}); removed it")
    return path


def _read_cifar(dataset: str, archive: Path):
    spec = CIFAR[dataset]

    def load(tar: tarfile.TarFile, name: str) -> dict:
        member = tar.extractfile(f"{spec.folder}/{name}")
        if member is None:
            raise KeyError(name)
        return pickle.load(member, encoding="bytes")

    try:
        with tarfile.open(archive, "r:gz") as tar:
            parts = [load(tar, n) for n in spec.train]
            test = load(tar, spec.test)
            classes = [c.decode() for c in load(tar, spec.meta)[spec.names_key]]
    except (tarfile.TarError, KeyError, EOFError, pickle.UnpicklingError, OSError) as e:
        raise DataError(f"{dataset}: cannot read {archive}: {e}") from None

    def arrays(batches):
        x = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(b[spec.label_key], dtype=np.int64) for b in batches])
        return x, y

    return arrays(parts), arrays([test]), classes


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # torchvision's pretrained weights'

# ILSVRC2012 as torchvision's ImageFolder reads it: its classes and images per split
IMAGENET = {"classes": 1000, "train": 1_281_167, "val": 50_000}


def list_folder(root: Path, split_names: tuple[str, str] = ("train", "test")):
    """`root/<train>/<class>/*` and `root/<test>/<class>/*`, with torchvision's ImageFolder discovery (class
    names = sorted folder names, its image extensions): ([(path, label)] per split, classes)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    splits, classes = [], None
    for split in split_names:
        d = root / split
        try:
            names, index = find_classes(str(d))
            samples = make_dataset(str(d), index, extensions=IMG_EXTENSIONS)
        except (FileNotFoundError, OSError) as e:
            hint = ("; found val/: rename it to test/ or use dataset: imagenet"
                    if split == "test" and not d.exists() and (root / "val").is_dir() else "")
            raise DataError(f"{d}: {e}{hint}") from None
        if classes is None:
            classes = names
        elif names != classes:
            diff = "; ".join(filter(None, [
                f"missing {sorted(set(classes) - set(names))}" if set(classes) - set(names) else "",
                f"not in train {sorted(set(names) - set(classes))}" if set(names) - set(classes) else ""]))
            raise DataError(f"{d}: its class folders differ from train's: {diff}")
        # files ImageFolder skips (not an image extension, not in a class folder): named, not silently dropped
        listed = {path for path, _ in samples}
        skipped = [os.path.relpath(f, d) for f in sorted(d.rglob("*")) if f.is_file() and str(f) not in listed]
        if skipped:
            names = ", ".join(skipped[:5]) + (f", … ({len(skipped) - 5} more)" if len(skipped) > 5 else "")
            print(f"{d}: skipped {len(skipped)} files that are not images in class folders: {names} "
                  f"(image extensions: {', '.join(IMG_EXTENSIONS)})", file=sys.stderr)
        splits.append(samples)
    return splits, classes


def _read_folder(root: Path, image_size: int, augment: str):
    """The folder's images decoded and fitted (`fit`) as uint8 arrays: (train, test, classes, resized)."""
    (train, test), classes = list_folder(root)
    s, resized, out = stored_size(image_size, augment), 0, []
    for samples in (train, test):
        images = []
        for path, _ in samples:
            x = read_image(path)
            resized += tuple(x.shape[1:]) != (s, s)
            images.append(fit(x, image_size, augment).numpy())
        out.append((np.stack(images), np.asarray([label for _, label in samples], dtype=np.int64)))
    return out[0], out[1], classes, resized


def _check_imagenet(root: Path, train: list, val: list, classes: list[str]) -> None:
    """ILSVRC2012's counts, or a one-line error naming the difference (`data.subset: true` says it is intended)."""
    found = {"classes": len(classes), "train": len(train), "val": len(val)}
    if found != IMAGENET:
        wrong = ", ".join(f"{found[k]:,} {k}" + (" images" if k != "classes" else "") + f" (ILSVRC2012: {IMAGENET[k]:,})"
                          for k in IMAGENET if found[k] != IMAGENET[k])
        raise DataError(f"{root}: not the whole ILSVRC2012: {wrong}; set data.subset: true if a subset is intended")


def _decoded(path: str) -> None:
    read_image(path)


def check_images(paths: list[str], chunk: int = 4096) -> None:
    """Decode every image once (PIL, in threads: its decoders release the GIL) and keep nothing: a truncated
    or unreadable file of a stream source is the same one-line error naming it as with `source: memory`, now
    rather than in a DataLoader worker epochs into training. The first bad file in listing order is named."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for start in range(0, len(paths), chunk):  # in chunks: never a million pending futures at once
            for _ in pool.map(_decoded, paths[start:start + chunk]):
                pass


def _stream_samples(root: Path, out_dir: Path, dataset: str = "folder", subset: bool = False):
    """What a stream source reads: each split's files as [path relative to samples.json's folder, label, bytes]."""
    (train, test), classes = list_folder(root, ("train", "val") if dataset == "imagenet" else ("train", "test"))
    if dataset == "imagenet" and not subset:
        _check_imagenet(root, train, test, classes)
    check_images([path for path, _ in train + test])
    rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731  (the prepared folder is renamed into out_dir)
    listed = {split: [[rel(p), label, os.path.getsize(p)] for p, label in samples]
              for split, samples in (("train", train), ("test", test))}
    return listed, classes


def stream_statistics(listed: dict, base: Path, image_size: int, augment: str, n: int = 1000) -> tuple[list, list]:
    """Per-channel mean/std of up to `n` training images spread evenly over the set (their `fit` views): the
    statistics of a set too large to decode whole."""
    rows = listed["train"]
    pick = rows[::max(1, len(rows) // n)][:n]
    sums = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for path, _, _ in pick:
        x = test_view(read_image(os.path.normpath(base / path)), image_size, augment).double() / 255
        sums += x.sum((1, 2))
        squares += (x * x).sum((1, 2))
        count += x.shape[1] * x.shape[2]
    mean = sums / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return [round(float(m), 6) for m in mean], [round(float(v), 6) for v in std]


def prepare(cfg, out_dir: Path, raw_dir: Path = Path("data/raw")) -> Manifest:
    """Build the prepared data for `cfg` (a config.Data) in `out_dir`; returns the manifest."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    size, augment = cfg.image_size, cfg.augment
    if cfg.source == "stream":
        listed, classes = _stream_samples(Path(cfg.path), out_dir, cfg.dataset, cfg.subset)
        labels = {split: np.asarray([label for _, label, _ in rows], dtype=np.int64) for split, rows in listed.items()}
        statistics = lambda: stream_statistics(listed, out_dir, size, augment)  # noqa: E731
        tmp.mkdir(parents=True)
        (tmp / "samples.json").write_text(json.dumps(listed) + "\n")
        train_y, test_y, sha256 = labels["train"], labels["test"], {"samples": file_sha256(tmp / "samples.json")}
        source = cfg.path
    else:
        if cfg.dataset == "synthetic":
            s = cfg.synthetic
            (tx, ty), (vx, vy) = synthetic.generate(s.num_classes, s.train_size, s.test_size, s.seed)
            train, test = (fit(tx, size, augment).numpy(), ty.numpy()), (fit(vx, size, augment).numpy(), vy.numpy())
            classes = synthetic.class_names(s.num_classes)
            source = f"kdpipe synthetic (seed {s.seed})"
        elif cfg.dataset == "folder":
            train, test, classes, resized = _read_folder(Path(cfg.path), size, augment)
            source = cfg.path
            if resized:
                s = stored_size(size, augment)
                print(f"{cfg.path}: resized {resized} images to {s}x{s} ({augment} convention)", file=sys.stderr)
        else:
            raw_dir.mkdir(parents=True, exist_ok=True)
            archive = download(cfg.dataset, raw_dir, cfg.mirror)
            (tx, ty), (vx, vy), classes = _read_cifar(cfg.dataset, archive)
            fitted = lambda x: fit(torch.from_numpy(x), size, augment).numpy()  # noqa: E731
            train, test = (fitted(tx), ty), (fitted(vx), vy)
            source = mirror_url(cfg.mirror) + CIFAR[cfg.dataset].filename
        tmp.mkdir(parents=True)
        for name, arr in zip(ARRAYS, (*train, *test)):
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
        def statistics():
            pixels = torch.from_numpy(train[0]).float().div_(255)
            return [round(float(m), 6) for m in pixels.mean((0, 2, 3))], [round(float(s), 6) for s in pixels.std((0, 2, 3))]
        train_y, test_y = train[1], test[1]
        sha256 = {name: file_sha256(tmp / f"{name}.npy") for name in ARRAYS}
    if train_y.min() < 0 or max(train_y.max(), test_y.max()) >= len(classes):
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{cfg.dataset}: labels outside 0..{len(classes) - 1}")
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.normalize == "imagenet" else statistics()
    manifest = {
        "dataset": cfg.dataset,
        "source": source,
        "num_classes": len(classes),
        "classes": classes,
        "train_size": int(len(train_y)),
        "test_size": int(len(test_y)),
        "image_size": size,
        "augment": augment,
        "storage": cfg.source,
        "mean": mean,
        "std": std,
        "sha256": sha256,
    }
    if cfg.dataset in FOLDER_DATASETS:
        manifest["class_counts"] = {split: dict(zip(classes, np.bincount(y, minlength=len(classes)).tolist()))
                                    for split, y in (("train", train_y), ("test", test_y))}
        if cfg.source == "memory":
            manifest["resized"] = resized
    typed = Manifest.model_validate(manifest)  # what the later stages read back (config/data.py)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return typed
