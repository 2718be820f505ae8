"""The strong view of a training batch (MLKD's): FixMatch's RandAugment with Cutout, on uint8 image tensors.

As MLKD's `RandAugment(2, 10)` (Jin-Ying/Multi-Level-Logit-Distillation, `mdistiller/dataset/cifar100.py`): two
operations drawn with replacement from fourteen, each at a magnitude uniform in its range, then Cutout of a square
of side U(0, 0.5) x the image width filled with (125, 123, 114), always. All draws come from the caller's generator.
The geometric operations follow PIL's affine convention (each output pixel centre mapped to the input, nearest
pixel, black outside) and equal PIL's outputs; the colour operations are torchvision's tensor versions of PIL's
(`ImageEnhance`, `ImageOps`): equal to PIL's, but AutoContrast, Color and Contrast within one grey level (rounding); tested.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as TF

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
