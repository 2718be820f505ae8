"""Data sources: what the training loop draws batches from.

A source gives `epoch(g, batch_size, ddp, views)` (the shuffled, augmented, normalised training batches of one
epoch as `(step, x, y, index)`, `index` being each sample's position in the training set; with
`views=("strong",)`, x is the pair (the usual view, a strong view: its own crop and flip, then RandAugment and
Cutout, kdpipe/augment.py), which MLKD asks for) and
`test(batch_size)` (the normalised test batches, the evaluation view); the loop does not know which source
it has. All randomness comes from the generator `g` the loop owns and checkpoints, so a resumed run draws
exactly what an uninterrupted one would. `open_source` picks the source the prepared data was made for.

`MemorySource` (`data.source: memory`): the prepared uint8 arrays live on the training device; every batch
is augmented and normalised there in a few batched tensor ops (no DataLoader, no worker processes): the
fast choice for data that fits in memory (CIFAR-sized sets).

`StreamSource` (`data.source: stream`): the image files, decoded and augmented per epoch by DataLoader
worker processes, for sets larger than memory. Each image's augmentation is drawn from its own seed (the
epoch's seed from `g` plus its index), so the batches are the same whatever the number of workers.

Augmentations (`data.augment`, kdpipe/augment.py): `cifar`, a random crop of the image zero-padded by 4 and a horizontal flip;
`imagenet`, torchvision's reference recipe: RandomResizedCrop(image_size, scale 0.08-1, ratio 3/4-4/3) and
a flip for training, the shorter side resized to image_size / 0.875 and the centre image_size crop for the
test. The memory source draws the imagenet crops from each image's stored centre square (data.fit), the
stream source from the whole image, as torchvision does.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, Optional

import torch

from . import data as data_mod
from .augment import pad_crop_flip, rand_augment, random_resized_crop_flip, tv
from .data import Prepared
from .runtime import Ranks, Numerics


class Normalise:
    """uint8 pixels -> float inputs normalised with a (mean, std) per channel (given for 0..1 pixels)."""

    def __init__(self, normalization: dict, numerics: Numerics):
        dev = numerics.device
        self.mean = torch.tensor(normalization["mean"], device=dev).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(normalization["std"], device=dev).view(1, 3, 1, 1) * 255
        self.numerics = numerics

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.numerics.layout((x.float() - self.mean) / self.std)


VIEWS = ("strong",)  # the extra views a source can add to each batch


def check_views(views) -> bool:
    """Whether the strong view is asked for (the only extra view there is)."""
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown data views {unknown}; known: {list(VIEWS)}")
    return "strong" in views


def kept(size: int, ddp: Ranks) -> int:
    """How many images of a global batch of `size` the ranks train on: equal shards for every rank (the remainder
    dropped), and none where a rank would get a single image (BatchNorm cannot train on it)."""
    size -= size % ddp.world
    return size if size >= 2 * ddp.world else 0


def batches(n: int, batch_size: int, g: torch.Generator, ddp: Ranks) -> Iterator:
    """One epoch's shuffled batches of sample indices, `(step, global batch)`, each cut to what the ranks keep."""
    perm = torch.randperm(n, generator=g, device=g.device)
    for step in range(math.ceil(n / batch_size)):
        idx = perm[step * batch_size:(step + 1) * batch_size]
        idx = idx[:kept(len(idx), ddp)]
        if len(idx):
            yield step, idx


def shard_sizes(n: int, batch_size: int, ddp: Ranks) -> list[int]:
    """The batch sizes one rank trains on in an epoch of `batches`: the first batch's, then the last one's where it
    differs (what torch.compile must compile before the timed epochs)."""
    last = n % batch_size or batch_size
    sizes = dict.fromkeys(kept(k, ddp) // ddp.world for k in (min(n, batch_size), last))
    return [k for k in sizes if k]


class MemorySource:
    def __init__(self, prepared: Prepared, numerics: Numerics, normalization: Optional[dict] = None):
        self.data = prepared.to(numerics.device)
        self.manifest = prepared.manifest
        self.numerics = numerics
        self.normalise = Normalise(normalization or prepared.manifest.normalization, numerics)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def train_size(self) -> int:
        return len(self.data.train.y)

    def steps(self, batch_size: int) -> int:
        return math.ceil(self.train_size / batch_size)

    @property
    def train_labels(self) -> torch.Tensor:
        return self.data.train.y

    def crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.manifest.augment == "imagenet":
            return random_resized_crop_flip(x, self.image_size, g)
        return pad_crop_flip(x, g)

    def augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.normalise(self.crop_flip(x, g))

    @property
    def image_size(self) -> int:
        return self.manifest.image_size

    def epoch(self, g: torch.Generator, batch_size: int, ddp: Ranks = Ranks(), views=()) -> Iterator:
        train, strong = self.data.train, check_views(views)
        for step, idx in batches(self.train_size, batch_size, g, ddp):
            # every rank augments the whole global batch with the shared generator, then takes its
            # shard: the random streams stay in step and the augmentation equals a single process's
            pixels, y = train.x[idx], train.y[idx]
            x = self.augment(pixels, g)
            if strong:
                x = (x, self.normalise(rand_augment(self.crop_flip(pixels, g), g)))
            if ddp.world > 1:
                x = tuple(v[ddp.rank::ddp.world] for v in x) if strong else x[ddp.rank::ddp.world]
                y, idx = y[ddp.rank::ddp.world], idx[ddp.rank::ddp.world]
            yield step, x, y, idx

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation view of stored uint8 images: their centre image_size crop (torchvision's `center_crop`;
        images stored at that size, as `cifar` stores them, are their own view and never import torchvision)."""
        s = self.image_size
        return x if tuple(x.shape[-2:]) == (s, s) else tv("center_crop")(x, [s, s])

    def train_pixels(self, indices: list[int]) -> torch.Tensor:
        """Training images `indices` as uint8 at the evaluation view (no augmentation): `kdpipe quantize`'s
        calibration images."""
        return self.centre(self.data.train.x[torch.tensor(indices, dtype=torch.int64)])

    def pixels(self, split: str, batch_size: int = 1000) -> Iterator:
        """The images of `split` ("train", "test") as uint8 (x, y) batches in their order at image_size (the evaluation
        view, no augmentation), not normalised."""
        s = getattr(self.data, split)
        for i in range(0, len(s.y), batch_size):
            yield self.centre(s.x[i:i + batch_size]), s.y[i:i + batch_size]

    def test_pixels(self, batch_size: int = 1000) -> Iterator:
        return self.pixels("test", batch_size)

    def test(self, batch_size: int = 1000) -> Iterator:
        for x, y in self.test_pixels(batch_size):
            yield self.normalise(x), y


class Images(torch.utils.data.Dataset):
    """Image files decoded and augmented one at a time (in DataLoader workers). Items are `(index, seed)`:
    the augmentation of an image depends on its seed alone, never on the worker that decodes it."""

    def __init__(self, paths: list[str], sizes: list[int], labels: torch.Tensor, image_size: int, augment: str,
                 train: bool):
        self.paths, self.sizes, self.labels = paths, sizes, labels
        self.image_size, self.augment, self.train = image_size, augment, train
        self.strong = False  # train: also return the strong view (its own crop and flip, then RandAugment + Cutout)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> torch.Tensor:
        """Image `i` decoded, or a one-line DataError naming its file."""
        path = self.paths[i]
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise data_mod.DataError(f"{path}: {e.strerror or type(e).__name__} (listed by `kdpipe data`: re-run it "
                                     "if the folder changed)") from None
        if size != self.sizes[i]:
            raise data_mod.DataError(f"{path}: changed since `kdpipe data` listed it (re-run `kdpipe data`)")
        return data_mod.read_image(path)

    def __getitem__(self, item):
        i, seed = item
        x, n = self.read(i), self.image_size
        if not self.train:
            return data_mod.test_view(x, n, self.augment)  # what the memory source's test sees, exactly
        g = torch.Generator().manual_seed(seed)
        weak = self.crop_flip(x, g)
        return (weak, rand_augment(self.crop_flip(x, g)[None], g)[0]) if self.strong else weak

    def crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = self.image_size
        if self.augment == "cifar":
            return pad_crop_flip(data_mod.fit(x, n, "cifar")[None], g)[0]
        return random_resized_crop_flip(x[None], n, g)[0]  # from the whole decoded image, as torchvision


def _one_thread(_):  # worker processes decode one image each: no intra-op threads fighting the others
    torch.set_num_threads(1)


class StreamSource:
    def __init__(self, data_dir: Path, numerics: Numerics, workers: int = 2, normalization: Optional[dict] = None):
        self.manifest, splits = data_mod.load_samples(data_dir)
        self.numerics, self.workers = numerics, workers
        self.normalise = Normalise(normalization or self.manifest.normalization, numerics)
        size, augment = self.manifest.image_size, self.manifest.augment
        self.splits = {name: Images(paths, sizes, labels, size, augment, train=name == "train")
                       for name, (paths, sizes, labels) in splits.items()}
        # every split at the evaluation view (no augmentation), what `pixels` reads
        self.plain = {name: Images(paths, sizes, labels, size, augment, train=False)
                      for name, (paths, sizes, labels) in splits.items()}

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def train_size(self) -> int:
        return len(self.splits["train"])

    @property
    def train_labels(self) -> torch.Tensor:
        return self.splits["train"].labels.to(self.numerics.device)

    def steps(self, batch_size: int) -> int:
        return math.ceil(self.train_size / batch_size)

    def _load(self, split: str, item_batches: list, seed: int = 0, augmented: bool = True) -> Iterator:
        # its own generator: the workers' seeds come from `seed`, not from the process's default generator
        # (which Dropout draws from), so loading draws nothing a run's results depend on
        dataset = self.splits[split] if augmented else self.plain[split]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=item_batches, num_workers=self.workers,
                                             worker_init_fn=_one_thread if self.workers else None,
                                             generator=torch.Generator().manual_seed(seed),
                                             pin_memory=self.numerics.device.type == "cuda")
        dev = self.numerics.device
        batches = iter(loader)
        for items in item_batches:  # the loader returns the batches in this order
            try:
                x = next(batches)  # a list of views where the items are pairs
            except StopIteration:
                return
            except Exception as e:  # a worker's error arrives with the worker's traceback in its message
                raise self._failure(split, items, e) from None
            yield tuple(v.to(dev, non_blocking=True) for v in x) if isinstance(x, list) else x.to(dev, non_blocking=True)

    def _failure(self, split: str, items: list, error: Exception) -> data_mod.DataError:
        """The one-line error of a batch that did not load: its files are read again here to name the bad one."""
        for i, _ in items:
            try:
                self.splits[split].read(i)
            except data_mod.DataError as e:
                return e
        last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        return data_mod.DataError(f"loading the {split} images failed: {last}")

    def epoch(self, g: torch.Generator, batch_size: int, ddp: Ranks = Ranks(), views=()) -> Iterator:
        self.splits["train"].strong = check_views(views)
        # the epoch's plan is drawn up front from `g` (what a resume restores): batches, then one seed
        plan = [(step, idx[ddp.rank::ddp.world].tolist()) for step, idx in batches(self.train_size, batch_size, g, ddp)]
        epoch_seed = int(torch.randint(2 ** 62, (1,), generator=g, device=g.device))
        items = [[(i, epoch_seed + i) for i in idx] for _, idx in plan]
        labels = self.train_labels
        for (step, idx), x in zip(plan, self._load("train", items, epoch_seed)):
            index = torch.tensor(idx, device=self.numerics.device)
            x = tuple(self.normalise(v) for v in x) if isinstance(x, tuple) else self.normalise(x)
            yield step, x, labels[index], index

    def train_pixels(self, indices: list[int]) -> torch.Tensor:
        train = self.splits["train"]
        return torch.stack([data_mod.test_view(data_mod.read_image(train.paths[i]), train.image_size, train.augment)
                            for i in indices])

    def pixels(self, split: str, batch_size: int = 1000) -> Iterator:
        n = len(self.splits[split])
        items = [[(i, 0) for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]
        labels = self.splits[split].labels.to(self.numerics.device)
        for (first, x) in zip(range(0, n, batch_size), self._load(split, items, augmented=False)):
            yield x, labels[first:first + len(x)]

    def test_pixels(self, batch_size: int = 1000) -> Iterator:
        return self.pixels("test", batch_size)

    def test(self, batch_size: int = 1000) -> Iterator:
        for x, y in self.test_pixels(batch_size):
            yield self.normalise(x), y


def open_source(data_dir: str | Path, numerics: Numerics, workers: int | str = 2, normalization: Optional[dict] = None):
    """The source the prepared data in `data_dir` was made for (its manifest's `storage`); `workers` "auto": as many
    decoding processes as cores this process may use (its affinity), at most 8."""
    if workers == "auto":
        workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if data_mod.read_manifest(data_dir).storage == "stream":
        return StreamSource(Path(data_dir), numerics, workers, normalization)
    return MemorySource(data_mod.load(data_dir, numerics.device), numerics, normalization)


def renormalisation(data_norm: dict, normalization: Optional[dict], device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(scale, shift) turning inputs normalised with the data's statistics (`data_norm`: mean, std) into inputs
    normalised with a checkpoint's own (an imported teacher's); None where they agree."""
    if not normalization or (normalization["mean"], normalization["std"]) == (data_norm["mean"], data_norm["std"]):
        return None
    view = (1, 3, 1, 1)
    md, sd = (torch.tensor(data_norm[k], device=device).view(view) for k in ("mean", "std"))
    mt, st = (torch.tensor(normalization[k], device=device).view(view) for k in ("mean", "std"))
    return sd / st, (md - mt) / st
