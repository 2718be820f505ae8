"""What training and evaluation read of `kdpipe data`'s output (kdpipe/prepare.py writes it): the prepared
arrays or file listing, checked against the manifest, and the resizing (`fit`, `test_view`) both data sources apply.
Preparing (the CIFAR download, the image-folder listing, the synthetic set) lives apart, so that the training
stages do not depend on it: editing the downloader re-runs the data stage alone.

Output folder (a DVC output), `data.source: memory`: train_x.npy (N x 3 x S x S uint8), train_y.npy (int64),
test_x.npy, test_y.npy and manifest.json (dataset, classes, counts, image size, augmentation, per-channel
mean/std, sha256 of each array). S is `image_size` for the `cifar` augmentation; for `imagenet` it is the
evaluation's resize, round(image_size / 0.875), every image's centre square (see `fit`). With
`data.source: stream` (an image folder larger than memory) nothing is kept decoded (`kdpipe data` decodes each
file once, to check it): samples.json lists
each split's files (path relative to the folder, label, size in bytes) and the manifest's sha256 is that
list's; the training source decodes the files per epoch (kdpipe/sources.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pydantic import ValidationError

from .config import Error, Manifest

ARRAYS = ("train_x", "train_y", "test_x", "test_y")


class DataError(Error):
    pass


EVAL_CROP = 0.875  # torchvision's reference evaluation: resize the shorter side to size / 0.875, centre crop size


def stored_size(image_size: int, augment: str) -> int:
    """The side of the images a memory source stores: the evaluation's resize for `imagenet`."""
    return image_size if augment == "cifar" else round(image_size / EVAL_CROP)


def fit(x: torch.Tensor, image_size: int, augment: str) -> torch.Tensor:
    """uint8 images (..., 3, H, W) as a memory source stores them: `cifar`: resized to image_size x image_size
    (aspect not kept, like CIFAR's own 32 x 32; unchanged at that size); `imagenet`: the shorter side resized
    to round(image_size / 0.875) and the centre square kept, so training crops at random within it and the
    test takes its centre image_size crop (the reference evaluation). Bilinear, antialiased (torchvision)."""
    s = stored_size(image_size, augment)
    if augment == "cifar" and tuple(x.shape[-2:]) == (s, s):
        return x  # torchvision (~2 s to import) is imported where it is used
    from torchvision.transforms.v2 import functional as TF

    if augment == "cifar":
        return TF.resize(x, [s, s], antialias=True)
    return TF.center_crop(TF.resize(x, s, antialias=True), [s, s])


def test_view(x: torch.Tensor, image_size: int, augment: str) -> torch.Tensor:
    """What the test sees of a uint8 image: the centre image_size crop of its `fit` (both sources, both
    conventions: the reference evaluation for `imagenet`, the image itself for `cifar`)."""
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(fit(x, image_size, augment), [image_size, image_size])


def read_image(path: str) -> torch.Tensor:
    """An image file as RGB uint8 (3, H, W), decoded with PIL (every format ImageFolder lists)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Split:
    x: torch.Tensor  # uint8 N x 3 x S x S, on the training device
    y: torch.Tensor  # int64 N


@dataclass
class Prepared:
    train: Split
    test: Split
    manifest: Manifest

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def to(self, device) -> "Prepared":
        if self.train.x.device == torch.device(device):
            return self
        move = lambda s: Split(s.x.to(device), s.y.to(device))  # noqa: E731
        return Prepared(move(self.train), move(self.test), self.manifest)


def read_manifest(data_dir: str | Path) -> Manifest:
    """The prepared data's manifest.json (dataset, classes, mean/std, sha256), without loading the arrays."""
    mf = Path(data_dir) / "manifest.json"
    if not mf.is_file():
        raise DataError(f"{data_dir}: no prepared data (run `kdpipe data` first)")
    try:
        return Manifest.model_validate_json(mf.read_text())
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise DataError(f"{mf}: not a manifest of `kdpipe data` ({where + ': ' if where else ''}{err['msg']}); "
                        "re-run `kdpipe data`") from None


def load(data_dir: str | Path, device: torch.device | str = "cpu") -> Prepared:
    """Load prepared arrays onto `device`, checking them against the manifest's sha256."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if manifest.storage == "stream":
        raise DataError(f"{data_dir}: streamed data (data.source: stream) holds no arrays to load")
    arrays = {}
    for name in ARRAYS:
        path = data_dir / f"{name}.npy"
        if not path.is_file() or file_sha256(path) != manifest.sha256[name]:
            raise DataError(f"{path}: missing or does not match manifest.json (re-run `kdpipe data`)")
        arrays[name] = torch.from_numpy(np.load(path)).to(device)
    return Prepared(Split(arrays["train_x"], arrays["train_y"]), Split(arrays["test_x"], arrays["test_y"]), manifest)


def load_samples(data_dir: str | Path) -> tuple[Manifest, dict]:
    """A stream source's prepared data: (manifest, {split: ([file paths], labels tensor)}), checked against
    the manifest's sha256, with each file's size checked against the listing when it is read."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    path = data_dir / "samples.json"
    if not path.is_file() or file_sha256(path) != manifest.sha256.get("samples"):
        raise DataError(f"{path}: missing or does not match manifest.json (re-run `kdpipe data`)")
    listed = json.loads(path.read_text())
    return manifest, {split: ([os.path.normpath(data_dir / p) for p, _, _ in rows], [size for _, _, size in rows],
                              torch.tensor([label for _, label, _ in rows], dtype=torch.int64))
                      for split, rows in listed.items()}
