"""Data sources: what the training loop draws batches from.

A source gives `epoch(g, batch_size, ddp)` (the shuffled, augmented, normalised training batches of one
epoch as `(step, x, y, index)`, `index` being each sample's position in the training set) and
`test(batch_size)` (the normalised test batches); the loop does not know which source it has. All
randomness comes from the generator `g` the loop owns and checkpoints, so a resumed run draws exactly
what an uninterrupted one would.

`MemorySource`: the prepared uint8 arrays live on the training device; every batch is cropped, flipped
and normalised there in a few batched tensor ops (no DataLoader, no worker processes) — the fast choice
for data that fits in memory (CIFAR-sized sets).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .data import Prepared
from .runtime import Dist, Numerics


class Normalise:
    """uint8 pixels -> float inputs normalised with a (mean, std) per channel (given for 0..1 pixels)."""

    def __init__(self, normalization: dict, numerics: Numerics):
        dev = numerics.device
        self.mean = torch.tensor(normalization["mean"], device=dev).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(normalization["std"], device=dev).view(1, 3, 1, 1) * 255
        self.numerics = numerics

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.numerics.layout((x.float() - self.mean) / self.std)


def pad_crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The CIFAR augmentation on a uint8 batch (B, 3, S, S): a random S x S crop of the image zero-padded by
    `pad`, then a horizontal flip with probability 1/2, each image drawn independently from `g`."""
    b, s, dev = x.shape[0], x.shape[-1], x.device
    offsets = torch.arange(s, device=dev)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=g, device=dev) + offsets
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=g, device=dev) + offsets
    flip = torch.rand(b, generator=g, device=dev) < 0.5
    dx = torch.where(flip[:, None], dx.flip(1), dx)  # a flip is a reversed column index
    rows = padded.gather(2, dy[:, None, :, None].expand(b, 3, s, s + 2 * pad))
    return rows.gather(3, dx[:, None, None, :].expand(b, 3, s, s))


class MemorySource:
    def __init__(self, prepared: Prepared, numerics: Numerics, normalization: Optional[dict] = None):
        self.data = prepared.to(numerics.device)
        self.manifest = prepared.manifest
        self.numerics = numerics
        self.normalise = Normalise(normalization or prepared.manifest, numerics)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def train_size(self) -> int:
        return len(self.data.train.y)

    def steps(self, batch_size: int) -> int:
        return math.ceil(self.train_size / batch_size)

    def augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.normalise(pad_crop_flip(x, g))

    def epoch(self, g: torch.Generator, batch_size: int, ddp: Dist = Dist()) -> Iterator:
        train, dev = self.data.train, self.data.train.x.device
        perm = torch.randperm(self.train_size, generator=g, device=dev)
        for step in range(self.steps(batch_size)):
            idx = perm[step * batch_size:(step + 1) * batch_size]
            idx = idx[:len(idx) - len(idx) % ddp.world]  # equal shards for every rank
            if len(idx) < 2 * ddp.world:  # BatchNorm cannot train on a single image
                continue
            # every rank augments the whole global batch with the shared generator, then takes its
            # shard: the random streams stay in step and the augmentation equals a single process's
            x, y = self.augment(train.x[idx], g), train.y[idx]
            if ddp.world > 1:
                x, y, idx = x[ddp.rank::ddp.world], y[ddp.rank::ddp.world], idx[ddp.rank::ddp.world]
            yield step, x, y, idx

    def test(self, batch_size: int = 1000) -> Iterator:
        test = self.data.test
        for i in range(0, len(test.y), batch_size):
            yield self.normalise(test.x[i:i + batch_size]), test.y[i:i + batch_size]


def renormalisation(manifest: dict, normalization: Optional[dict], device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(scale, shift) turning inputs normalised with the data's statistics into inputs normalised with a
    checkpoint's own (an imported teacher's); None where they agree."""
    if not normalization or (normalization["mean"], normalization["std"]) == (manifest["mean"], manifest["std"]):
        return None
    view = (1, 3, 1, 1)
    md, sd = (torch.tensor(manifest[k], device=device).view(view) for k in ("mean", "std"))
    mt, st = (torch.tensor(normalization[k], device=device).view(view) for k in ("mean", "std"))
    return sd / st, (md - mt) / st
