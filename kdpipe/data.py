"""`kdpipe data`: fetch CIFAR (or draw the embedded synthetic set) and write compact uint8 arrays.

Output folder (a DVC output): train_x.npy (N x 3 x 32 x 32 uint8), train_y.npy (int64), test_x.npy,
test_y.npy and manifest.json (dataset, classes, counts, per-channel mean/std, sha256 of each array).
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
from .config import Error

MIRROR_ENV = "KDPIPE_CIFAR_MIRROR"
ARRAYS = ("train_x", "train_y", "test_x", "test_y")


class DataError(Error):
    pass


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


def _read_image(path: str) -> tuple[np.ndarray, bool]:
    """An image file as RGB uint8 (3, 32, 32); other sizes are resized with PIL's bilinear filter
    (antialiased when shrinking, aspect ratio not kept). Returns (pixels, resized)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            resized = im.size != (32, 32)
            if resized:
                im = im.resize((32, 32), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1), resized
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def _read_folder(root: Path):
    """`root/train/<class>/*` and `root/test/<class>/*`, with torchvision's ImageFolder discovery (class
    names = sorted folder names, its image extensions)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    splits, classes, resized = [], None, 0
    for split in ("train", "test"):
        d = root / split
        try:
            names, index = find_classes(str(d))
            samples = make_dataset(str(d), index, extensions=IMG_EXTENSIONS)
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"{d}: {e}") from None
        if classes is None:
            classes = names
        elif names != classes:
            diff = "; ".join(filter(None, [
                f"missing {sorted(set(classes) - set(names))}" if set(classes) - set(names) else "",
                f"not in train {sorted(set(names) - set(classes))}" if set(names) - set(classes) else ""]))
            raise DataError(f"{d}: its class folders differ from train's: {diff}")
        # files ImageFolder skips (not an image extension): said, not silently dropped
        skipped = sum(1 for f in d.rglob("*") if f.is_file() and not f.name.lower().endswith(IMG_EXTENSIONS))
        if skipped:
            print(f"{d}: skipped {skipped} files that are not images ({', '.join(IMG_EXTENSIONS)})", file=sys.stderr)
        images = []
        for path, _ in samples:
            x, r = _read_image(path)
            images.append(x)
            resized += r
        y = np.asarray([label for _, label in samples], dtype=np.int64)
        splits.append((np.stack(images), y))
    return splits[0], splits[1], classes, resized


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(cfg, out_dir: Path, raw_dir: Path = Path("data/raw")) -> dict:
    """Build the prepared arrays for `cfg` (a config.Data) in `out_dir`; returns the manifest."""
    if cfg.dataset == "synthetic":
        s = cfg.synthetic
        (tx, ty), (vx, vy) = synthetic.generate(s.num_classes, s.train_size, s.test_size, s.seed)
        train, test = (tx.numpy(), ty.numpy()), (vx.numpy(), vy.numpy())
        classes = synthetic.class_names(s.num_classes)
        source = f"kdpipe synthetic (seed {s.seed})"
    elif cfg.dataset == "folder":
        train, test, classes, resized = _read_folder(Path(cfg.path))
        source = cfg.path
        if resized:
            print(f"{cfg.path}: resized {resized} images to 32x32 (PIL bilinear)", file=sys.stderr)
    else:
        raw_dir.mkdir(parents=True, exist_ok=True)
        archive = download(cfg.dataset, raw_dir, cfg.mirror)
        train, test, classes = _read_cifar(cfg.dataset, archive)
        source = mirror_url(cfg.mirror) + CIFAR[cfg.dataset].filename
    if train[1].min() < 0 or max(train[1].max(), test[1].max()) >= len(classes):
        raise DataError(f"{cfg.dataset}: labels outside 0..{len(classes) - 1}")

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, arr in zip(ARRAYS, (*train, *test)):
        np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
    pixels = torch.from_numpy(train[0]).float().div_(255)
    manifest = {
        "dataset": cfg.dataset,
        "source": source,
        "num_classes": len(classes),
        "classes": classes,
        "train_size": int(len(train[1])),
        "test_size": int(len(test[1])),
        "mean": [round(float(m), 6) for m in pixels.mean((0, 2, 3))],
        "std": [round(float(s), 6) for s in pixels.std((0, 2, 3))],
        "sha256": {name: _sha256(tmp / f"{name}.npy") for name in ARRAYS},
    }
    if cfg.dataset == "folder":
        manifest["class_counts"] = {split: dict(zip(classes, np.bincount(y, minlength=len(classes)).tolist()))
                                    for split, y in (("train", train[1]), ("test", test[1]))}
        manifest["resized"] = resized
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return manifest


@dataclass
class Split:
    x: torch.Tensor  # uint8 N x 3 x 32 x 32, on the training device
    y: torch.Tensor  # int64 N


@dataclass
class Prepared:
    train: Split
    test: Split
    manifest: dict

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    def to(self, device) -> "Prepared":
        if self.train.x.device == torch.device(device):
            return self
        move = lambda s: Split(s.x.to(device), s.y.to(device))  # noqa: E731
        return Prepared(move(self.train), move(self.test), self.manifest)


def read_manifest(data_dir: str | Path) -> dict:
    """The prepared data's manifest.json (dataset, classes, mean/std, sha256), without loading the arrays."""
    mf = Path(data_dir) / "manifest.json"
    if not mf.is_file():
        raise DataError(f"{data_dir}: no prepared data (run `kdpipe data` first)")
    return json.loads(mf.read_text())


def load(data_dir: str | Path, device: torch.device | str = "cpu") -> Prepared:
    """Load prepared arrays onto `device`, checking them against the manifest's sha256."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    arrays = {}
    for name in ARRAYS:
        path = data_dir / f"{name}.npy"
        if not path.is_file() or _sha256(path) != manifest["sha256"][name]:
            raise DataError(f"{path}: missing or does not match manifest.json (re-run `kdpipe data`)")
        arrays[name] = torch.from_numpy(np.load(path)).to(device)
    return Prepared(Split(arrays["train_x"], arrays["train_y"]), Split(arrays["test_x"], arrays["test_y"]), manifest)
