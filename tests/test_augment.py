"""kdpipe/augment.py: the strong view (MLKD's FixMatch RandAugment + Cutout) against PIL, which MLKD's code runs, and
the sources' strong views (drawn from the run's generator, paired with the usual view, independent of the worker
count); the imagenet crops against torchvision's `get_params` and plain bilinear resampling."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torchvision.transforms.v2 import functional as TF

from kdpipe import augment, sources
from kdpipe.prepare import prepare
from kdpipe.runtime import Numerics

from .test_sources import folder_data

CPU = Numerics(torch.device("cpu"), False, False)


@pytest.fixture
def image():
    a = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return Image.fromarray(a), torch.from_numpy(a).permute(2, 0, 1).contiguous()


def diff(ours: torch.Tensor, pil: Image.Image) -> int:
    return int(np.abs(ours.permute(1, 2, 0).numpy().astype(int) - np.asarray(pil).astype(int)).max())


@pytest.mark.parametrize("v", [0.3, -0.17])
@pytest.mark.parametrize("shape", [(32, 32), (24, 32)])  # height, width: not square, the axes cannot be swapped
def test_geometric_operations_equal_pils(v, shape):
    a = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    pil, t = Image.fromarray(a), torch.from_numpy(a).permute(2, 0, 1).contiguous()
    h, w = shape
    def affine(*m):
        return augment.pil_affine(t[None], *m)[0]

    assert diff(affine(1, v, 0, 0, 1, 0), pil.transform(pil.size, Image.AFFINE, (1, v, 0, 0, 1, 0))) == 0
    assert diff(affine(1, 0, 0, v, 1, 0), pil.transform(pil.size, Image.AFFINE, (1, 0, 0, v, 1, 0))) == 0
    assert diff(affine(1, 0, v * w, 0, 1, 0), pil.transform(pil.size, Image.AFFINE, (1, 0, v * w, 0, 1, 0))) == 0
    assert diff(affine(1, 0, 0, 0, 1, v * h), pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, v * h))) == 0
    assert diff(augment.rotate(t[None], [100 * v])[0], pil.rotate(100 * v)) == 0
    for i in (12, 13):  # TranslateX and TranslateY: a fraction of the width and of the height
        assert diff(augment.OPERATIONS[i][0](t[None], [v])[0], pil.transform(
            pil.size, Image.AFFINE, (1, 0, v * w, 0, 1, 0) if i == 12 else (1, 0, 0, 0, 1, v * h))) == 0


# FixMatch's list as MLKD runs it: (PIL's operation at magnitude v, lowest, highest), in its order
PIL_OPERATIONS = [
    (lambda im, v: ImageOps.autocontrast(im), 0, 1),
    (lambda im, v: ImageEnhance.Brightness(im).enhance(v), 0.05, 0.95),
    (lambda im, v: ImageEnhance.Color(im).enhance(v), 0.05, 0.95),
    (lambda im, v: ImageEnhance.Contrast(im).enhance(v), 0.05, 0.95),
    (lambda im, v: ImageOps.equalize(im), 0, 1),
    (lambda im, v: im, 0, 1),
    (lambda im, v: ImageOps.posterize(im, max(1, int(v))), 4, 8),
    (lambda im, v: im.rotate(v), -30, 30),
    (lambda im, v: ImageEnhance.Sharpness(im).enhance(v), 0.05, 0.95),
    (lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)), -0.3, 0.3),
    (lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)), -0.3, 0.3),
    (lambda im, v: ImageOps.solarize(im, v), 0, 256),
    (lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0)), -0.3, 0.3),
    (lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1])), -0.3, 0.3),
]


@pytest.mark.parametrize("u", [0.0, 0.37, 0.999])
def test_each_operation_is_fixmatchs_at_its_magnitude(u):
    # a low-contrast image (autocontrast and equalize then change it), not square (width vs height)
    a = np.random.default_rng(1).integers(40, 170, (24, 32, 3), dtype=np.uint8)
    pil, t = Image.fromarray(a), torch.from_numpy(a).permute(2, 0, 1).contiguous()
    assert len(augment.OPERATIONS) == len(PIL_OPERATIONS) == 14
    for i, ((op, low, high), (ref, ref_low, ref_high)) in enumerate(zip(augment.OPERATIONS, PIL_OPERATIONS)):
        assert (low, high) == (ref_low, ref_high), i
        v = low + (high - low) * u
        assert diff(op(t[None], [v])[0], ref(pil, v)) <= (1 if i in (0, 2, 3) else 0), i  # AutoContrast, Color, Contrast: rounding


def test_colour_operations_and_cutout_match_pils(image):
    pil, t = image
    assert diff(TF.autocontrast(t), ImageOps.autocontrast(pil)) == 0
    assert diff(TF.equalize(t), ImageOps.equalize(pil)) == 0
    assert diff(TF.posterize(t, 5), ImageOps.posterize(pil, 5)) == 0
    bits = [1, 2, 3, 4, 5, 6, 7, 8]  # a bit count per image, against torchvision's own, image by image
    batch = torch.stack([t.roll(k, 1) for k in range(8)])
    assert torch.equal(augment.posterize(batch, bits), torch.stack([TF.posterize(i, b) for i, b in zip(batch, bits)]))
    solarize = augment.OPERATIONS[11][0]
    assert diff(solarize(t[None], [100.5])[0], ImageOps.solarize(pil, 100.5)) == 0
    for v in (0.3, 0.8):
        assert diff(TF.adjust_brightness(t, v), ImageEnhance.Brightness(pil).enhance(v)) == 0
        assert diff(TF.adjust_sharpness(t, v), ImageEnhance.Sharpness(pil).enhance(v)) == 0
        assert diff(TF.adjust_saturation(t, v), ImageEnhance.Color(pil).enhance(v)) <= 1  # rounding
        assert diff(TF.adjust_contrast(t, v), ImageEnhance.Contrast(pil).enhance(v)) <= 1
    side, cx, cy = 11.3, 17.6, 5.2  # CutoutAbs: corners (int(max(0, c - side / 2)), + side), both drawn
    x0, y0 = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    drawn = pil.copy()
    ImageDraw.Draw(drawn).rectangle((x0, y0, min(32, x0 + side), min(32, y0 + side)), augment.CUTOUT_FILL)
    assert diff(augment.cutout(t[None], [(side, cx, cy)])[0], drawn) == 0


def test_rand_augment_draws_two_operations_and_a_cutout_from_the_generator(image):
    _, t = image
    batch = t[None].repeat(4, 1, 1, 1)
    a = augment.rand_augment(batch, torch.Generator().manual_seed(1))
    b = augment.rand_augment(batch, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == batch.shape
    assert not torch.equal(a[0], a[1])  # each image its own draws
    fill = torch.tensor(augment.CUTOUT_FILL)[:, None]
    assert all((img.flatten(1) == fill).all(0).any() for img in a)  # a Cutout square on every image (side > 0)


def test_rand_augment_runs_each_operation_on_a_batch_as_image_by_image():
    # 64 images of their own, 128 draws: every operation, several per batch, at magnitudes of their own
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (64, 3, 24, 32), dtype=np.uint8))
    out = augment.rand_augment(x, torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)  # the draws, replayed and applied one image at a time
    ops = torch.randint(14, (64, 2), generator=replay).tolist()
    mags = torch.rand(64, 2, generator=replay, dtype=torch.float64).tolist()
    cut = torch.rand(64, 3, generator=replay, dtype=torch.float64).tolist()
    assert {i for row in ops for i in row} == set(range(14))
    for img, got, op_ids, us, (s, u, v) in zip(x, out, ops, mags, cut):
        for i, m in zip(op_ids, us):
            op, low, high = augment.OPERATIONS[i]
            img = op(img[None], [low + (high - low) * m])[0]
        img = augment.cutout(img[None], [(s * 0.5 * 32, 1 + 31 * u, 1 + 23 * v)])[0]
        assert torch.equal(got, img)


def test_memory_source_adds_the_strong_view(tmp_path):
    from .conftest import tiny_params
    from kdpipe import config

    prepare(config.validate(tiny_params()).data, tmp_path / "m")
    src = sources.open_source(tmp_path / "m", CPU)
    g = torch.Generator().manual_seed(0)
    step, (x, xs), y, idx = next(iter(src.epoch(g, 8, views=("strong",))))
    replay = torch.Generator().manual_seed(0)
    order = torch.randperm(src.train_size, generator=replay)[:8]
    pixels = src.data.train.x[order]
    weak = src.normalise(augment.pad_crop_flip(pixels, replay))
    strong = src.normalise(augment.rand_augment(augment.pad_crop_flip(pixels, replay), replay))
    assert torch.equal(idx, order) and torch.equal(x, weak) and torch.equal(xs, strong)
    with pytest.raises(ValueError, match="unknown data views"):
        next(iter(src.epoch(g, 8, views=("weird",))))


def test_stream_strong_view_is_independent_of_workers(tmp_path, photos):
    prepare(folder_data(photos, image_size=40, augment="imagenet", source="stream"), tmp_path / "s")

    def one_epoch(workers):
        g = torch.Generator().manual_seed(0)
        return [x for _, x, _, _ in sources.open_source(tmp_path / "s", CPU, workers).epoch(g, 8, views=("strong",))]

    a, b = one_epoch(0), one_epoch(2)
    assert all(isinstance(x, tuple) and len(x) == 2 for x in a)
    # auto: as many as the cores this process may use (at most 8), the same batches
    assert sources.open_source(tmp_path / "s", CPU, "auto").workers == min(8, len(os.sched_getaffinity(0)))
    assert all(torch.equal(u, v) for x, z in zip(a, one_epoch("auto")) for u, v in zip(x, z))
    assert all(torch.equal(u, v) for x, z in zip(a, b) for u, v in zip(x, z))
    assert not torch.equal(a[0][0], a[0][1])


def reference_boxes(target, aspect, u, h, w, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, one image at a time, on given random draws."""
    out = []
    for t_row, a_row, (u0, u1) in zip(target.tolist(), aspect.tolist(), u.tolist()):
        for t, a in zip(t_row, a_row):
            cw, ch = round(math.sqrt(t * a)), round(math.sqrt(t / a))
            if 0 < cw <= w and 0 < ch <= h:
                out.append((math.floor(u0 * (h - ch + 1)), math.floor(u1 * (w - cw + 1)), ch, cw))
                break
        else:
            out.append(((h - min(h, w)) // 2, (w - min(h, w)) // 2, min(h, w), min(h, w)))  # square images
    return out


def test_resized_crop_boxes_follow_torchvision_get_params():
    g = torch.Generator().manual_seed(3)
    got = augment.resized_crop_boxes(64, 50, 50, g)
    g = torch.Generator().manual_seed(3)  # the same draws, in the same order, for the reference loop
    target = 2500 * torch.empty(64, 10).uniform_(0.08, 1.0, generator=g)
    aspect = torch.exp(torch.empty(64, 10).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g))
    u = torch.rand(64, 2, generator=g)
    assert [tuple(int(v) for v in row) for row in got] == reference_boxes(target, aspect, u, 50, 50)
    top, left, h, w = got.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 50).all() and (left + w <= 50).all()
    assert (h * w).min() < 2500 * 0.3 and (h != w).any()  # small and non-square crops do occur


def test_random_resized_crop_is_bilinear_resampling_of_the_box():
    x = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    got = augment.random_resized_crop_flip(x, 24, g)  # boxes <= 20 px resampled up to 24: plain bilinear
    assert got.dtype == torch.uint8 and got.shape == (4, 3, 24, 24)
    g = torch.Generator().manual_seed(1)
    boxes = augment.resized_crop_boxes(4, 20, 20, g)
    flip = torch.rand(4, generator=g) < 0.5
    for i, (top, left, h, w) in enumerate(boxes.long().tolist()):
        crop = x[i:i + 1, :, top:top + h, left:left + w].float()
        ref = F.interpolate(crop, size=(24, 24), mode="bilinear", align_corners=False)[0]
        ref = ref.flip(2) if flip[i] else ref
        # uint8: the bilinear value (fixed-point kernel) within 1, plus the fp32 reference's own rounding
        assert (got[i].float() - ref).abs().max() <= 1 + 1e-3
