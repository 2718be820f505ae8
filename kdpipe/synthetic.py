"""The embedded dataset: CIFAR-shaped images that kdpipe draws itself, deterministically from a seed.

Each class is a (shape, texture) pair: class c has shape `c % S` and texture `c // S` with
S = ceil(sqrt(num_classes)) (10 classes: 4 shapes x 3 textures; 100 classes: 10 x 10). Everything
else is nuisance that the network must learn to ignore: position, scale, rotation (+-30 deg),
foreground/background colours (random hues, so colour says nothing about the class), a background
gradient, one or two solid distractor shapes of random type, and Gaussian pixel noise. Distractors may
overlap the object, which makes the task learnable but not trivial, and deeper nets do better.
All drawing is batched tensor arithmetic on the CPU: 6000 images take about a second.
"""

from __future__ import annotations

import math

import torch

SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond", "star", "crescent", "bar", "ell")
TEXTURES = ("solid", "stripes", "checker", "dots", "rings", "cross_stripes", "gradient", "grid", "diag", "spots")


def _shape_mask(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Soft-free binary masks of every image's shape, in local coordinates u, v (unit = object size)."""
    r = torch.sqrt(u * u + v * v)
    phi = torch.atan2(v, u)
    masks = torch.stack([
        r < 1.0,                                                       # disc
        torch.maximum(u.abs(), v.abs()) < 0.8,                         # square
        (v > -0.6) & (v < 0.9 - 1.7 * u.abs()),                        # triangle
        ((u.abs() < 0.3) & (v.abs() < 1.0)) | ((v.abs() < 0.3) & (u.abs() < 1.0)),  # cross
        (r > 0.55) & (r < 1.0),                                        # ring
        u.abs() + v.abs() < 1.05,                                      # diamond
        r < 0.55 + 0.4 * torch.cos(5 * phi),                           # star
        (r < 1.0) & ((u - 0.45) ** 2 + v * v > 0.6),                   # crescent
        (u.abs() < 1.0) & (v.abs() < 0.35),                            # bar
        ((u.abs() < 0.9) & (v > 0.3) & (v < 0.9)) | ((u > -0.9) & (u < -0.3) & (v.abs() < 0.9)),  # ell
    ])  # (num_shapes, B, H, W)
    return masks.gather(0, kind.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)


def _texture(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-pixel foreground intensity in [0.35, 1] for every image's texture."""
    f = 2 * math.pi * 2.2
    tex = torch.stack([
        torch.ones_like(u),                                            # solid
        (torch.sin(f * u) > 0).float(),                                # stripes
        ((torch.sin(f * u) > 0) ^ (torch.sin(f * v) > 0)).float(),     # checker
        ((torch.sin(f * u) * torch.sin(f * v)) > 0.25).float(),        # dots
        (torch.sin(f * torch.sqrt(u * u + v * v)) > 0).float(),        # concentric rings
        (torch.sin(f * v) > 0).float(),                                # stripes the other way
        (u + 1).clamp(0, 2) / 2,                                       # gradient
        ((torch.sin(f * u).abs() < 0.4) | (torch.sin(f * v).abs() < 0.4)).float(),  # grid
        (torch.sin(f * (u + v) * 0.7) > 0).float(),                    # diagonal stripes
        (torch.cos(3 * f * u) * torch.cos(3 * f * v) > 0.5).float(),   # fine spots
    ])
    t = tex.gather(0, kind.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)
    return 0.35 + 0.65 * t


def _hue_to_rgb(h: torch.Tensor) -> torch.Tensor:
    """Fully saturated colours for hues in [0, 1): (B,) -> (B, 3)."""
    k = torch.stack([h * 6, h * 6 + 4, h * 6 + 2], 1) % 6  # r, g, b phases
    return 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _local_coords(g: torch.Generator, n: int, size: int, scale_range, rot: float):
    """Random centre/scale/rotation per image -> local coordinates u, v of shape (n, size, size)."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    cx = 9 + torch.rand(n, generator=g) * (size - 18)
    cy = 9 + torch.rand(n, generator=g) * (size - 18)
    s = scale_range[0] + torch.rand(n, generator=g) * (scale_range[1] - scale_range[0])
    th = (torch.rand(n, generator=g) * 2 - 1) * rot
    dx = (xx - cx.view(-1, 1, 1)) / s.view(-1, 1, 1)
    dy = (yy - cy.view(-1, 1, 1)) / s.view(-1, 1, 1)
    c, si = torch.cos(th).view(-1, 1, 1), torch.sin(th).view(-1, 1, 1)
    return c * dx + si * dy, -si * dx + c * dy


def grid_side(num_classes: int) -> int:
    """Shapes per texture: class c is shape c % side, texture c // side."""
    return math.ceil(math.sqrt(num_classes))


def class_names(num_classes: int) -> list[str]:
    side = grid_side(num_classes)
    return [f"{SHAPES[c % side]}/{TEXTURES[c // side]}" for c in range(num_classes)]


def _draw(labels: torch.Tensor, num_classes: int, g: torch.Generator, size: int = 32) -> torch.Tensor:
    n = len(labels)
    side = grid_side(num_classes)
    shape, texture = labels % side, labels // side
    # background: a random colour with a random linear gradient
    bg = torch.rand(n, 3, generator=g) * 0.45
    grad_dir = torch.rand(n, 2, generator=g) * 2 - 1
    ramp = torch.linspace(-0.5, 0.5, size)
    img = bg.view(n, 3, 1, 1) + 0.25 * (grad_dir[:, 0].view(n, 1, 1, 1) * ramp.view(1, 1, 1, -1)
                                        + grad_dir[:, 1].view(n, 1, 1, 1) * ramp.view(1, 1, -1, 1))
    img = img.expand(n, 3, size, size).clone()
    # distractors: up to two small solid shapes of any type, drawn behind and in front of the object
    n_distract = (torch.rand(n, generator=g) < 0.7).long() + (torch.rand(n, generator=g) < 0.3).long()
    for k in range(2):
        u, v = _local_coords(g, n, size, (2.5, 4.5), math.pi)
        mask = _shape_mask(torch.randint(0, len(SHAPES), (n,), generator=g), u, v) & (n_distract > k).view(-1, 1, 1)
        colour = _hue_to_rgb(torch.rand(n, generator=g)) * (0.4 + 0.6 * torch.rand(n, 1, generator=g))
        if k == 1:  # the second distractor goes on top of the object, so remember it and draw later
            front = (mask, colour)
            continue
        img = torch.where(mask.unsqueeze(1), colour.view(n, 3, 1, 1), img)
    # the object itself: the class's shape filled with the class's texture in a random colour
    u, v = _local_coords(g, n, size, (7.0, 11.0), math.radians(30))
    mask = _shape_mask(shape, u, v)
    fg = 0.15 + 0.85 * _hue_to_rgb(torch.rand(n, generator=g)) * (0.75 + 0.25 * torch.rand(n, 1, generator=g))
    tex = _texture(texture, u, v)
    img = torch.where(mask.unsqueeze(1), fg.view(n, 3, 1, 1) * tex.unsqueeze(1), img)
    mask, colour = front
    img = torch.where(mask.unsqueeze(1), colour.view(n, 3, 1, 1), img)
    img = img + 0.06 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def generate(num_classes: int, train_size: int, test_size: int, seed: int, chunk: int = 2048):
    """Balanced train/test sets: (x uint8 N x 3 x 32 x 32, y int64 N) for each split."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (train_size, test_size):
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = torch.cat([_draw(y[i:i + chunk], num_classes, g) for i in range(0, n, chunk)])
        out.append((x, y))
    return out
