"""A class-balanced subset of an image folder (train/<class>/*, test/<class>/*) as links: CI's smoke runs on the
real JPEGs. Usage: python tools/image_subset.py IMAGES OUT SPLIT=FROM:N ..., e.g. `train=train:8 val=test:4`
(OUT/val/<class>/ links the first 4 files of each IMAGES/test/<class>/)."""

import os
import sys
from pathlib import Path


def linked_subset(images: Path, out: Path, splits: dict) -> None:
    """splits maps each split of `out` to (the split of `images` it is taken from, images per class)."""
    for split, (src, n) in splits.items():
        for c in sorted(d.name for d in (images / src).iterdir() if d.is_dir()):
            (out / split / c).mkdir(parents=True)
            for f in sorted((images / src / c).iterdir())[:n]:
                os.symlink(f, out / split / c / f.name)


if __name__ == "__main__":
    images, out, *specs = sys.argv[1:]
    splits = {}
    for spec in specs:
        split, source = spec.split("=")
        src, n = source.split(":")
        splits[split] = (src, int(n))
    linked_subset(Path(images).absolute(), Path(out), splits)  # links that resolve from anywhere
