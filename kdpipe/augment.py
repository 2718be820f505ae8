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


def tv(name: str):
    """torchvision's functional transform `name`, imported on first use: importing torchvision costs a process ~2 s
    (most of it torch._dynamo, which only training's optimiser imports too), which the stages of a CIFAR-style run
    (pad-crop-flip, images stored at their size) never pay (tested)."""
    from torchvision.transforms.v2 import functional

    return getattr(functional, name)


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
    out = [tv("resized_crop")(img, *box, [size, size], antialias=True) for img, box in zip(x, boxes)]
    return torch.stack([img.flip(2) if f else img for img, f in zip(out, flip)])



CUTOUT_FILL = (125, 123, 114)


def pil_affine(x: torch.Tensor, a, b, c, d, e, f) -> torch.Tensor:
    """PIL's `Image.transform(size, AFFINE, (a, b, c, d, e, f), NEAREST)` on a uint8 batch (B, 3, H, W), each
    coefficient a float or one per image (float64, (B,)): the output pixel (x, y) takes the input pixel at
    floor(a (x + .5) + b (y + .5) + c, d (x + .5) + e (y + .5) + f), or black."""
    n, ch, h, w = x.shape
    a, b, c, d, e, f = (torch.as_tensor(k, dtype=torch.float64, device=x.device).reshape(-1, 1, 1)
                        for k in (a, b, c, d, e, f))
    y, xx = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float64) + 0.5,
                           torch.arange(w, device=x.device, dtype=torch.float64) + 0.5, indexing="ij")
    xs, ys = (a * xx + b * y + c).floor().long(), (d * xx + e * y + f).floor().long()
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    source = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)).expand(n, h, w).reshape(n, 1, h * w)
    return x.reshape(n, ch, h * w).gather(2, source.expand(n, ch, h * w)).reshape(n, ch, h, w) * inside[:, None]


def rotation(degrees: float, w: int, h: int) -> list[float]:
    """PIL's `img.rotate(degrees)` as its affine coefficients: counter-clockwise about the centre."""
    t = -math.radians(degrees % 360)
    m = [round(math.cos(t), 15), round(math.sin(t), 15), 0.0, round(-math.sin(t), 15), round(math.cos(t), 15), 0.0]
    cx, cy = w / 2.0, h / 2.0
    m[2], m[5] = m[0] * -cx + m[1] * -cy + cx, m[3] * -cx + m[4] * -cy + cy
    return m


def rotate(x: torch.Tensor, degrees: list[float]) -> torch.Tensor:
    """PIL's `img.rotate(degrees)` (nearest pixel, black corners) on a uint8 batch, one angle per image."""
    return pil_affine(x, *zip(*(rotation(v, x.shape[-1], x.shape[-2]) for v in degrees)))


def each_image(name: str):
    """torchvision's per-image operation `name(img, v)` applied to a batch, one magnitude per image."""
    return lambda x, v: torch.stack([tv(name)(img, m) for img, m in zip(x, v)])


def per_image(v: list[float], x: torch.Tensor) -> torch.Tensor:
    """Magnitudes, one per image, as a float64 column that broadcasts over a batch like `x` (B, 3, H, W)."""
    return torch.tensor(v, dtype=torch.float64, device=x.device).view(-1, 1, 1, 1)


def brightness(x: torch.Tensor, v: list[float]) -> torch.Tensor:
    """torchvision's `adjust_brightness` (uint8 x factor in float32, clamped, truncated), a factor per image."""
    return x.mul(per_image(v, x).float()).clamp_(0, 255).to(torch.uint8)


def solarize(x: torch.Tensor, v: list[float]) -> torch.Tensor:
    """PIL's `ImageOps.solarize`: pixels at or above the threshold inverted (compared in float32, as a uint8 tensor
    against a Python float is), a threshold per image."""
    return torch.where(x >= per_image(v, x).float(), 255 - x, x)


def posterize(x: torch.Tensor, v: list[float]) -> torch.Tensor:
    """torchvision's `posterize` of uint8 images to max(1, int(v)) bits, per image: each pixel ANDed with the mask of
    its image's top bits (torchvision's own formula; tested against it)."""
    masks = [(0xFF << (8 - max(1, int(m)))) & 0xFF for m in v]
    return x & torch.tensor(masks, dtype=torch.uint8, device=x.device).view(-1, 1, 1, 1)


# (operation on a batch with a magnitude per image, lowest, highest magnitude): FixMatch's list as MLKD uses it.
# torchvision's blends with the image's grey or blurred self (Color, Contrast, Sharpness) run image by image: their
# factor enters an add with alpha, whose rounding (fused multiply-add or not) a per-image tensor would not keep
OPERATIONS = [
    (lambda x, v: tv("autocontrast")(x), 0, 1),  # per image and channel
    (brightness, 0.05, 0.95),
    (each_image("adjust_saturation"), 0.05, 0.95),  # PIL's ImageEnhance.Color
    (each_image("adjust_contrast"), 0.05, 0.95),
    (lambda x, v: tv("equalize")(x), 0, 1),  # per image and channel
    (lambda x, v: x, 0, 1),  # identity
    (posterize, 4, 8),
    (rotate, -30, 30),
    (each_image("adjust_sharpness"), 0.05, 0.95),
    (lambda x, v: pil_affine(x, 1, v, 0, 0, 1, 0), -0.3, 0.3),  # ShearX
    (lambda x, v: pil_affine(x, 1, 0, 0, v, 1, 0), -0.3, 0.3),  # ShearY
    (solarize, 0, 256),
    (lambda x, v: pil_affine(x, 1, 0, [m * x.shape[-1] for m in v], 0, 1, 0), -0.3, 0.3),  # TranslateX, of the width
    (lambda x, v: pil_affine(x, 1, 0, 0, 0, 1, [m * x.shape[-2] for m in v]), -0.3, 0.3),  # TranslateY
]


def cutout(x: torch.Tensor, squares: list[tuple[float, float, float]]) -> torch.Tensor:
    """FixMatch's CutoutAbs on a uint8 batch, one (side, cx, cy) per image (side 0: none): the square from
    (int(max(0, c - side / 2))) to that + side, both corners included as PIL's `ImageDraw.rectangle` draws them,
    clipped to the image, filled with CUTOUT_FILL."""
    h, w = x.shape[-2:]
    boxes = []
    for side, cx, cy in squares:
        x0, y0 = int(max(0.0, cx - side / 2.0)), int(max(0.0, cy - side / 2.0))
        boxes.append((x0, y0, int(min(w, x0 + side)), int(min(h, y0 + side))) if side > 0 else (0, 0, -1, -1))
    x0, y0, x1, y1 = torch.tensor(boxes, device=x.device).T.reshape(4, -1, 1, 1)
    rows = torch.arange(h, device=x.device)[:, None]
    cols = torch.arange(w, device=x.device)
    inside = (rows >= y0) & (rows <= y1) & (cols >= x0) & (cols <= x1)
    fill = torch.tensor(CUTOUT_FILL, dtype=x.dtype, device=x.device)[:, None, None]
    return torch.where(inside[:, None], fill, x)


def rand_augment(x: torch.Tensor, g: torch.Generator, n: int = 2) -> torch.Tensor:
    """RandAugment(n) + Cutout on a uint8 batch (B, 3, H, W), each image's draws from `g`; at each of the n draws
    each operation runs once, on the images that drew it (the same pixels as image by image: tested)."""
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    ops = torch.randint(len(OPERATIONS), (b, n), generator=g, device=g.device).tolist()
    mags = torch.rand(b, n, generator=g, device=g.device, dtype=torch.float64).tolist()
    cut = torch.rand(b, 3, generator=g, device=g.device, dtype=torch.float64).tolist()
    x = x.clone()
    for j in range(n):
        for i, (op, low, high) in enumerate(OPERATIONS):
            rows = [r for r in range(b) if ops[r][j] == i]
            if rows:
                index = torch.tensor(rows, device=x.device)
                x[index] = op(x[index], [low + (high - low) * mags[r][j] for r in rows])
    # Cutout(v): v = U(0, 0.5) of the width; its centre as np.random.uniform(w), i.e. in (1, w]
    return cutout(x, [(s * 0.5 * w, 1 + (w - 1) * u, 1 + (h - 1) * v) for s, u, v in cut])
