"""Decoded + augmented + normalised images/s of the stream source at 224 px (docs/performance.md), against
torchvision's own ImageFolder + reference transforms in a DataLoader, side by side in one run on the same files
(kdpipe's workers ship uint8 and the training process normalises, on the GPU where there is one).

    python examples/stream_throughput.py [SOURCE_FOLDER] [--images 400] [--workers 0 2]

The test images are SOURCE_FOLDER's (default: ../shared/data/cifar10-jpeg-mini) upscaled to 500 x 375 and saved
as JPEG quality 90, about ImageNet's average photo, so decoding costs what it costs on real data."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def make_photos(source: Path, out: Path, n: int) -> None:
    from PIL import Image

    files = sorted(source.glob("train/*/*"))[:: max(1, len(sorted(source.glob("train/*/*"))) // n)][:n]
    for i, f in enumerate(files):
        for split in ("train", "test"):
            d = out / split / f.parent.name
            d.mkdir(parents=True, exist_ok=True)
            if split == "train" or i % 10 == 0:
                Image.open(f).convert("RGB").resize((500, 375), Image.Resampling.BICUBIC).save(d / f"{i}.jpg", quality=90)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("source", nargs="?", default="../shared/data/cifar10-jpeg-mini")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args()
    import torchvision.transforms.v2 as T
    from torchvision.datasets import ImageFolder

    from kdpipe import config, prepare, sources
    from kdpipe.runtime import Numerics

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_photos(Path(args.source), tmp / "photos", args.images)
        cfg = config.Data(dataset="folder", path=str(tmp / "photos"), image_size=224, augment="imagenet",
                          normalize="imagenet", source="stream")
        prepare.prepare(cfg, tmp / "prepared")
        numerics = Numerics(torch.device("cpu"), False, False)
        # the peers' ImageNet training transforms (torchvision's reference recipe), normalised floats out
        reference = T.Compose([T.RandomResizedCrop(224, antialias=True), T.RandomHorizontalFlip(), T.PILToTensor(),
                               T.ToDtype(torch.float32, scale=True), T.Normalize(prepare.IMAGENET_MEAN, prepare.IMAGENET_STD)])
        for workers in args.workers:
            src = sources.open_source(tmp / "prepared", numerics, workers)
            loader = torch.utils.data.DataLoader(ImageFolder(str(tmp / "photos" / "train"), reference), batch_size=64,
                                                 shuffle=True, num_workers=workers)
            rows = []
            for label, run in (("torchvision ImageFolder + v2 transforms", lambda: sum(len(x) for x, _ in loader)),
                               ("kdpipe stream source", lambda: sum(len(x) for _, x, _, _ in src.epoch(torch.Generator().manual_seed(0), 64)))):
                run()  # warm-up: page cache, worker start
                t0 = time.perf_counter()
                n = run()
                rows.append((label, n / (time.perf_counter() - t0)))
            cores = max(workers, 1)
            for label, ips in rows:
                print(f"workers {workers}: {label:40s} {ips:7.1f} img/s ({ips / cores:6.1f} per core)")
            print(f"workers {workers}: ratio kdpipe / torchvision {rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
