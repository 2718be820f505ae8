"""The training augmentations, on uint8 image batches, every draw from the caller's generator.

`pad_crop_flip` (`data.augment: cifar`) and `random_resized_crop_flip` (`imagenet`, torchvision's reference recipe),
and the strong view of a training batch (MLKD's): FixMatch's RandAugment with Cutout (`rand_augment`).

RandAugment as MLKD's `RandAugment(2, 10)` (Jin-Ying/Multi-Level-Logit-Distillation, `mdistiller/dataset/cifar100.py`): two
operations drawn with replacement from fourteen, each at a magnitude uniform in its range, then Cutout of a square
of side U(0, 0.5) x the image width filled with (125, 123, 114), always.
The geometric operations follow PIL's affine convention (each output pixel centre mapped to the input, nearest
pixel, black outside) and equal PIL's outputs; the colour operations are torchvision's tensor versions of PIL's
(`ImageEnhance`, `ImageOps`): equal to PIL's, but AutoContrast, Color and Contrast within one grey level (rounding); tested.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


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


def resized_crop_boxes(n: int, h: int, w: int, g: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                       attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop's boxes for `n` images of h x w, drawn from `g` as torchvision's `get_params` draws
    them (up to 10 tries of an area fraction in `scale` and a log-uniform aspect ratio in `ratio`, the first
    that fits; else the centre crop with the ratio clamped): (n, 4) as (top, left, height, width)."""
    dev = g.device
    area = h * w
    target = area * torch.empty(n, attempts, device=dev).uniform_(*scale, generator=g)
    aspect = torch.exp(torch.empty(n, attempts, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g))
    cw = torch.sqrt(target * aspect).round()
    ch = torch.sqrt(target / aspect).round()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.float().argmax(1, keepdim=True)  # the first try that fits
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    in_ratio = w / h  # no try fits: the whole image, cut to the nearest allowed aspect ratio
    fw, fh = (w, round(w / ratio[0])) if in_ratio < ratio[0] else (round(h * ratio[1]), h) if in_ratio > ratio[1] else (w, h)
    ok = fits.any(1)
    cw, ch = torch.where(ok, cw, float(fw)), torch.where(ok, ch, float(fh))
    u = torch.rand(n, 2, generator=g, device=dev)
    top = torch.where(ok, (u[:, 0] * (h - ch + 1)).floor(), float((h - fh) // 2))
    left = torch.where(ok, (u[:, 1] * (w - cw + 1)).floor(), float((w - fw) // 2))
    return torch.stack([top, left, ch, cw], 1)


def random_resized_crop_flip(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """The imagenet training augmentation on a uint8 batch (B, 3, S, S): each image's RandomResizedCrop box
    resized to size x size by torchvision's own `resized_crop` (bilinear, antialiased), then flipped with
    probability 1/2. One call per image (boxes differ in size), on the batch's device."""
    boxes = resized_crop_boxes(x.shape[0], x.shape[-2], x.shape[-1], g).long().tolist()
    flip = (torch.rand(x.shape[0], generator=g, device=x.device) < 0.5).tolist()
    out = [TF.resized_crop(img, *box, [size, size], antialias=True) for img, box in zip(x, boxes)]
    return torch.stack([img.flip(2) if f else img for img, f in zip(out, flip)])



CUTOUT_FILL = (125, 123, 114)


def pil_affine(img: torch.Tensor, a: float, b: float, c: float, d: float, e: float, f: float) -> torch.Tensor:
    """PIL's `Image.transform(size, AFFINE, (a, b, c, d, e, f), NEAREST)` on a (3, H, W) uint8 tensor: the output
    pixel (x, y) takes the input pixel at floor(a (x + .5) + b (y + .5) + c, d (x + .5) + e (y + .5) + f), or black."""
    _, h, w = img.shape
    y, x = torch.meshgrid(torch.arange(h, device=img.device, dtype=torch.float64) + 0.5,
                          torch.arange(w, device=img.device, dtype=torch.float64) + 0.5, indexing="ij")
    xs, ys = (a * x + b * y + c).floor().long(), (d * x + e * y + f).floor().long()
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    out = img[:, ys.clamp(0, h - 1), xs.clamp(0, w - 1)]
    return out * inside


def rotate(img: torch.Tensor, degrees: float) -> torch.Tensor:
    """PIL's `img.rotate(degrees)`: counter-clockwise about the centre, nearest pixel, black corners."""
    _, h, w = img.shape
    t = -math.radians(degrees % 360)
    m = [round(math.cos(t), 15), round(math.sin(t), 15), 0.0, round(-math.sin(t), 15), round(math.cos(t), 15), 0.0]
    cx, cy = w / 2.0, h / 2.0
    m[2], m[5] = m[0] * -cx + m[1] * -cy + cx, m[3] * -cx + m[4] * -cy + cy
    return pil_affine(img, *m)


# (operation, lowest, highest magnitude): FixMatch's list as MLKD uses it
OPERATIONS = [
    (lambda x, v: TF.autocontrast(x), 0, 1),
    (TF.adjust_brightness, 0.05, 0.95),
    (TF.adjust_saturation, 0.05, 0.95),  # PIL's ImageEnhance.Color
    (TF.adjust_contrast, 0.05, 0.95),
    (lambda x, v: TF.equalize(x), 0, 1),
    (lambda x, v: x, 0, 1),  # identity
    (lambda x, v: TF.posterize(x, max(1, int(v))), 4, 8),
    (rotate, -30, 30),
    (TF.adjust_sharpness, 0.05, 0.95),
    (lambda x, v: pil_affine(x, 1, v, 0, 0, 1, 0), -0.3, 0.3),  # ShearX
    (lambda x, v: pil_affine(x, 1, 0, 0, v, 1, 0), -0.3, 0.3),  # ShearY
    (lambda x, v: torch.where(x >= v, 255 - x, x), 0, 256),  # Solarize: PIL inverts pixels >= the threshold
    (lambda x, v: pil_affine(x, 1, 0, v * x.shape[2], 0, 1, 0), -0.3, 0.3),  # TranslateX, a fraction of the width
    (lambda x, v: pil_affine(x, 1, 0, 0, 0, 1, v * x.shape[1]), -0.3, 0.3),  # TranslateY
]


def cutout(img: torch.Tensor, side: float, cx: float, cy: float) -> torch.Tensor:
    """FixMatch's CutoutAbs: the square from (int(max(0, c - side / 2))) to that + side, both corners included as
    PIL's `ImageDraw.rectangle` draws them, clipped to the image, filled with CUTOUT_FILL."""
    _, h, w = img.shape
    x0, y0 = int(max(0.0, cx - side / 2.0)), int(max(0.0, cy - side / 2.0))
    x1, y1 = int(min(w, x0 + side)), int(min(h, y0 + side))
    img = img.clone()
    img[:, y0:y1 + 1, x0:x1 + 1] = torch.tensor(CUTOUT_FILL, dtype=img.dtype, device=img.device)[:, None, None]
    return img


def rand_augment(x: torch.Tensor, g: torch.Generator, n: int = 2) -> torch.Tensor:
    """RandAugment(n) + Cutout on a uint8 batch (B, 3, H, W), each image's draws from `g`."""
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    ops = torch.randint(len(OPERATIONS), (b, n), generator=g, device=g.device).tolist()
    mags = torch.rand(b, n, generator=g, device=g.device, dtype=torch.float64).tolist()
    cut = torch.rand(b, 3, generator=g, device=g.device, dtype=torch.float64).tolist()
    out = []
    for img, op_ids, us, (s, u, v) in zip(x, ops, mags, cut):
        for i, u_mag in zip(op_ids, us):
            op, low, high = OPERATIONS[i]
            img = op(img, low + (high - low) * u_mag)
        if s > 0:  # Cutout(v): v = U(0, 0.5) of the width; its centre as np.random.uniform(w), i.e. in (1, w]
            img = cutout(img, s * 0.5 * w, 1 + (w - 1) * u, 1 + (h - 1) * v)
        out.append(img)
    return torch.stack(out)
