"""The methods published after MLKD (WTTM, SDD, WKD, RLD), each against an independent computation of its authors'
loss (written out with numpy, in float64, sample by sample), its gradients, and its defaults against the authors'
code or configs (the comment beside each names the file and line)."""

import math

import numpy as np
import pytest
import torch

from kdpipe import config, models
from kdpipe.distill import Distiller, TrainData, feature_shapes
from kdpipe.distill import functional as Fd

from .conftest import tiny_params


def rand_logits(n=6, c=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, c, generator=g), scale * torch.randn(n, c, generator=g)


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p, q):
    """KL(p || q) of two distributions over the same support, 0 log 0 = 0."""
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def build(teacher_name, student_name, methods, classes=10, **distill):
    p = config.validate(tiny_params(distill=distill))
    torch.manual_seed(0)
    teacher, student = models.create(teacher_name, classes), models.create(student_name, classes)
    obj = Distiller(teacher, methods, p.distill, feature_shapes(student), feature_shapes(teacher),
                    TrainData(torch.arange(40) % classes))
    return obj, teacher.eval(), student.eval(), p


# --- WTTM (zkxufo/TTM) -------------------------------------------------------------------------------------------
from kdpipe.distill.wttm import wttm  # noqa: E402


def np_wttm(s, t, gamma, weighted):
    """distiller_zoo/wttm.py and ttm.py, sample by sample: the teacher's softmax to the power gamma, renormalised,
    KL of it to the student's softmax; WTTM weighs each by the power transform's sum."""
    out = []
    for zs, zt in zip(s.double().numpy(), t.double().numpy()):
        powered = np_softmax(zt) ** gamma
        kl = np_kl(powered / powered.sum(), np_softmax(zs))
        out.append(powered.sum() * kl if weighted else kl)
    return float(np.mean(out))


@pytest.mark.parametrize("gamma, weighted", [(0.2, True), (0.1, False), (0.5, True), (1.0, False)])
def test_wttm_matches_the_authors_formula(gamma, weighted):
    s, t = rand_logits(seed=1)
    assert wttm(s, t, gamma, weighted).item() == pytest.approx(np_wttm(s, t, gamma, weighted), rel=1e-5)


def test_ttm_at_power_one_is_kd_at_temperature_one_and_the_weight_is_per_sample():
    s, t = rand_logits(seed=2)
    assert wttm(s, t, 1.0, False).item() == pytest.approx(Fd.kd(s, t, 1.0).item(), rel=1e-6)
    assert wttm(s, t, 1.0, True).item() == pytest.approx(Fd.kd(s, t, 1.0).item(), rel=1e-6)  # sum p_t = 1
    # each sample's KL is weighted by its own sum p_t^gamma: a uniform teacher row weighs C^(1 - gamma)
    t = torch.zeros(1, 10)
    assert wttm(s[:1], t, 0.2, True).item() == pytest.approx(10 ** 0.8 * wttm(s[:1], t, 0.2, False).item(), rel=1e-6)


def test_wttm_gradients_reach_the_student_logits_only():
    s, t = rand_logits(seed=3)
    s.requires_grad_(True)
    wttm(s, t, 0.2).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    torch.testing.assert_close(s.grad.sum(1), torch.zeros(6), atol=1e-6, rtol=0)  # softmax: shift-invariant


def test_wttm_defaults_are_the_authors():
    d = config.Distill().wttm
    assert d.gamma == 1.0  # train_student.py:60 `-r` default 1 (the README's commands keep it)
    assert d.alpha == 0.0  # README.md:22 `-a 0`: no extra KD
    assert (d.exponent, d.beta) == (0.2, 4.0)  # README.md:40-41 `--add wttm --ttm_l 0.2 ... -a 4`
    assert d.weighted is True  # distiller_zoo/wttm.py:19 `torch.mean(norm*KL)`


def test_wttm_in_the_objective():
    obj, teacher, student, p = build("resnet14", "resnet8", ["wttm"])
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss, _, terms = obj(student, x, y)
    with torch.no_grad():
        tl = teacher(x)
    sl = student(x)
    assert obj.weights == {"wttm": 4.0} and "kd" not in obj.terms
    expected = Fd.cross_entropy(sl, y) + 4.0 * wttm(sl, tl, 0.2, True)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# --- RLD (zju-SWJ/RLD) -------------------------------------------------------------------------------------------
from kdpipe.distill.rld import rld  # noqa: E402


def np_rld(s, t, y, scd, beta, temp, scd_temp):
    """mdistiller/distillers/RLD.py:13-39, sample by sample: SCD on (teacher's top class, rest) vs (student's label,
    rest); MCD over the classes the teacher ranks strictly below the label (none: 0)."""
    scd_terms, mcd_terms = [], []
    for zs, zt, label in zip(s.double().numpy(), t.double().numpy(), y.tolist()):
        ps, pt = np_softmax(zs / scd_temp), np_softmax(zt / scd_temp)
        top = int(np.argmax(zt))
        scd_terms.append(np_kl([pt[top], 1 - pt[top]], [ps[label], 1 - ps[label]]) * scd_temp ** 2)
        below = [j for j in range(len(zt)) if zt[j] < zt[label]]
        mcd_terms.append(np_kl(np_softmax(zt[below] / temp), np_softmax(zs[below] / temp)) * temp ** 2 if below else 0.0)
    return scd * float(np.mean(scd_terms)) + beta * float(np.mean(mcd_terms))


@pytest.mark.parametrize("scd, beta, temp, scd_temp", [(1.0, 8.0, 4.0, 4.0), (1.0, 8.0, 4.0, 1.0), (0.5, 2.0, 1.0, 2.0)])
def test_rld_matches_the_authors_formula(scd, beta, temp, scd_temp):
    s, t = rand_logits(n=8, seed=4)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    y[0] = t[0].argmin()  # a label the teacher ranks last: MCD has no class left for that sample
    y[1] = t[1].argmax()  # one the teacher gets right
    got = rld(s, t, y, scd, beta, temp, scd_temp).item()
    assert got == pytest.approx(np_rld(s, t, y, scd, beta, temp, scd_temp), rel=1e-5)


def test_rld_masks_the_label_and_the_classes_ranked_above_it():
    # a hand-sized case: teacher logits (3, 1, 2, 0), label 2. SCD compares the teacher's class 0 with the student's
    # class 2; MCD only the classes the teacher ranks below 2 (1 and 3): the student's logits of 0 and 2 do not count
    t = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    y = torch.tensor([2])
    s1, s2 = torch.tensor([[0.0, 1.0, 0.0, -1.0]]), torch.tensor([[5.0, 1.0, -3.0, -1.0]])
    mcd = lambda s: rld(s, t, y, 0.0, 1.0, 1.0, 1.0).item()  # noqa: E731
    assert mcd(s1) == pytest.approx(mcd(s2), abs=1e-7)
    expected = math.log((math.e / (math.e + 1)) / (math.e ** 2 / (math.e ** 2 + 1))) * math.e / (math.e + 1) + \
        math.log((1 / (math.e + 1)) / (1 / (math.e ** 2 + 1))) / (math.e + 1)  # KL(softmax(1, 0) || softmax(1, -1))
    assert mcd(s1) == pytest.approx(expected, rel=1e-5)
    scd = rld(s1, t, y, 1.0, 0.0, 1.0, 1.0).item()
    pt0, ps2 = torch.softmax(t, 1)[0, 0].item(), torch.softmax(s1, 1)[0, 2].item()
    assert scd == pytest.approx(pt0 * math.log(pt0 / ps2) + (1 - pt0) * math.log((1 - pt0) / (1 - ps2)), rel=1e-6)


def test_rld_gradients_reach_the_student_logits():
    s, t = rand_logits(seed=5)
    s.requires_grad_(True)
    y = torch.arange(6)
    rld(s, t, y).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_rld_defaults_are_the_authors():
    d = config.Distill().rld
    assert (d.gamma, d.alpha) == (1.0, 0.0)  # mdistiller/engine/cfg.py:180 RLD.CE_WEIGHT 1.0, no extra KD
    assert d.scd == 1.0  # cfg.py:181 RLD.ALPHA
    assert d.beta == 8.0  # cfg.py:182 RLD.BETA
    assert d.temperature == 4.0  # cfg.py:184 RLD.T
    assert d.scd_temperature is None  # README.md:22 `--same-t` (tools/train.py:191-192: ALPHA_T = T)
    assert d.warmup_epochs == 20  # cfg.py:185 RLD.WARMUP
    assert d.logit_std is False  # cfg.py:24 EXPERIMENT.LOGIT_STAND False (`--logit-stand` sets it)


def test_rld_in_the_objective_with_its_warmup_and_same_temperature():
    obj, teacher, student, p = build("resnet14", "resnet8", ["rld"])
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        tl = teacher(x)
    sl = student(x)
    assert obj.weights == {"rld": 1.0} and obj.gamma == 1.0
    for epoch, ramp in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (50, 1.0)):
        loss, _, _ = obj(student, x, y, epoch=epoch)
        expected = Fd.cross_entropy(sl, y) + ramp * rld(sl, tl, y, 1.0, 8.0, 4.0, 4.0)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# --- WKD (JiamingLv/WKD) -----------------------------------------------------------------------------------------
from kdpipe.distill.wkd import cosine_decay, wkd_feature, wkd_logit  # noqa: E402


def np_sinkhorn_distance(p, q, cost, reg, iters):
    """WKD.py:12-25 and :38 written with explicit sums: scalings u (from 1/n) and v of K = exp(-cost / reg)."""
    n = len(p)
    k = np.exp(-cost / reg)
    u = np.full(n, 1.0 / n)
    for _ in range(iters):
        v = np.array([q[j] / (sum(k[i, j] * u[i] for i in range(n)) + 1e-8) for j in range(n)])
        u = np.array([p[i] / (sum(k[i, j] * v[j] for j in range(n)) + 1e-8) for i in range(n)])
    return sum(u[i] * k[i, j] * v[j] * cost[i, j] for i in range(n) for j in range(n))


def np_wkd_logit(s, t, y, cost, temp, weight, reg, iters):
    """WKD.py:43-69, sample by sample."""
    target, wd = [], []
    for zs, zt, label in zip(s.double().numpy(), t.double().numpy(), y.tolist()):
        target.append(-np_softmax(zt)[label] * math.log(np_softmax(zs)[label]))
        rest = [j for j in range(len(zs)) if j != label]
        c = np.maximum(cost.double().numpy()[np.ix_(rest, rest)], 0) + 1e-8
        wd.append(np_sinkhorn_distance(np_softmax(zs[rest] / temp), np_softmax(zt[rest] / temp), c, reg, iters))
    return float(np.mean(target)) + weight * float(np.mean(wd))


def class_cost(w, sharpen):
    w = w.double().numpy()
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    d = 1 - w @ w.T
    return torch.from_numpy(1 - np.exp(-sharpen * d) if sharpen else d)


@pytest.mark.parametrize("temp, weight, reg, iters", [(8.0, 600.0, 0.05, 10), (4.0, 1.0, 0.1, 3), (1.0, 30.0, 0.05, 1)])
def test_wkd_logit_matches_the_authors_sinkhorn(temp, weight, reg, iters):
    s, t = rand_logits(n=4, c=7, seed=6)
    y = torch.tensor([0, 3, 6, 3])
    g = torch.Generator().manual_seed(1)
    cost = class_cost(torch.randn(7, 5, generator=g), 1.0).float()
    cost = cost + 0.2 * torch.rand(7, 7, generator=g)  # not symmetric: K and its transpose differ
    got = wkd_logit(s, t, y, cost, temp, weight, reg, iters).item()
    assert got == pytest.approx(np_wkd_logit(s, t, y, cost, temp, weight, reg, iters), rel=1e-4)


def test_wkd_logit_distance_approaches_the_transport_cost():
    # under the 0/1 cost the exact Wasserstein distance is the total variation 1/2 |p - q|_1; Sinkhorn at a small
    # regularisation (0.1: exp(-1 / 0.1) stays well above the code's 1e-8 guards) gets close, and the distance of a
    # distribution to itself is ~0
    p, q = torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[0.2, 0.2, 0.6]])
    s, t = torch.cat([torch.zeros(1, 1), p.log()], 1), torch.cat([torch.zeros(1, 1), q.log()], 1)  # class 0: target
    cost = 1 - torch.eye(4)
    y = torch.tensor([0])
    target = -(torch.softmax(t, 1)[0, 0] * torch.log_softmax(s, 1)[0, 0]).item()
    wd = wkd_logit(s, t, y, cost, 1.0, 1.0, 0.1, 200).item() - target
    assert wd == pytest.approx(0.5 * (p - q).abs().sum().item(), abs=1e-3)
    assert wkd_logit(s, s, y, cost, 1.0, 1.0, 0.1, 200).item() - target == pytest.approx(0.0, abs=1e-3)


def np_wkd_feature(fs, ft, ratio, grid, eps):
    """WKD.py:72-118: per cell (adaptive pooling's bounds) and channel, mean and sqrt(unbiased var + eps)."""
    fs, ft = fs.double().numpy(), ft.double().numpy()
    b, c, h, w = fs.shape
    mean = std = 0.0
    for i in range(grid):
        for j in range(grid):
            rows = slice(math.floor(i * h / grid), math.ceil((i + 1) * h / grid))
            cols = slice(math.floor(j * w / grid), math.ceil((j + 1) * w / grid))
            for n in range(b):
                for ch in range(c):
                    a, z = fs[n, ch, rows, cols].ravel(), ft[n, ch, rows, cols].ravel()
                    mean += (a.mean() - z.mean()) ** 2
                    std += (math.sqrt(a.var(ddof=1) + eps) - math.sqrt(z.var(ddof=1) + eps)) ** 2
    return (ratio * mean + std) / (grid * grid * b)


@pytest.mark.parametrize("grid, size", [(1, 8), (4, 8), (2, 7), (3, 8)])
def test_wkd_feature_matches_the_authors_gaussian_distance(grid, size):
    g = torch.Generator().manual_seed(grid)
    fs, ft = torch.randn(2, 3, size, size, generator=g), torch.rand(2, 3, size, size, generator=g)
    assert wkd_feature(fs, ft, 4.0, grid, 1e-5).item() == pytest.approx(np_wkd_feature(fs, ft, 4.0, grid, 1e-5), rel=1e-5)


def test_wkd_gradients_reach_the_student():
    s, t = rand_logits(seed=7)
    s.requires_grad_(True)
    cost = class_cost(torch.randn(10, 4, generator=torch.Generator().manual_seed(2)), 1.0).float()
    wkd_logit(s, t, torch.arange(6), cost).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    fs = torch.randn(2, 3, 8, 8, requires_grad=True)
    wkd_feature(fs, torch.randn(2, 3, 8, 8), 4.0, 4).backward()
    assert torch.isfinite(fs.grad).all() and fs.grad.abs().sum() > 0


def test_wkd_weights_decay_along_a_cosine_after_epoch_150():
    # WKD.py:203-211: epoch e from 1; e <= 150: the full weight; then 0.5 (1 + cos((e - 150) / 90 pi)), 0 at 240
    assert [cosine_decay(e - 1, 150, 240) for e in (1, 150)] == [1.0, 1.0]
    assert cosine_decay(150, 150, 240) == pytest.approx(0.5 * (1 + math.cos(math.pi / 90)))
    assert cosine_decay(194, 150, 240) == pytest.approx(0.5)
    assert cosine_decay(239, 150, 240) == pytest.approx(0.0, abs=1e-12)
    assert cosine_decay(0, 0, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 100)))  # the code's default start 0


def test_wkd_defaults_are_the_authors():
    d = config.Distill().wkd
    # configs/cifar100/wkd_l/res32x4_res8x4.yaml
    assert (d.gamma, d.alpha) == (1.0, 0.0)  # :22 CE_WEIGHT 1.0
    assert d.beta == 600.0  # :23 WKD_LOGIT_WEIGHT
    assert d.feat_weight == 0.0  # :24 WKD_FEAT_WEIGHT
    assert (d.decay_start, d.decay_end) == (150, 240)  # :25 COSINE_DECAY_EPOCH, :12 EPOCHS
    assert (d.sinkhorn_lambda, d.sinkhorn_iters) == (0.05, 10)  # :27 SINKHORN.LAMBDA, :28 ITER
    assert d.cost_sharpen == 1.0  # :31 COST_MATRIX_SHARPEN
    assert d.temperature == 8.0  # :32 TEMPERATURE
    # configs/cifar100/wkd_f/res32x4_res8x4.yaml (WKD-F, weight 0.08 there)
    assert (d.eps, d.hint_layer, d.mean_cov_ratio, d.projector, d.grid) == (1e-5, -1, 4.0, "conv1x1", 1)  # :26-30


def test_wkd_cost_is_the_teacher_classifiers_cosine_and_the_objective_adds_both_parts():
    obj, teacher, student, p = build("resnet14", "resnet8", ["wkd"], wkd={"feat_weight": 0.08})
    term = obj.terms["wkd"]
    torch.testing.assert_close(term.cost.double(), class_cost(teacher.fc.weight.detach(), 1.0), rtol=0, atol=1e-6)
    assert obj.weights == {"wkd": 1.0} and "cost" not in obj.state_dict() and isinstance(term.regressor[0], torch.nn.Conv2d)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    obj.eval()
    with torch.no_grad():
        t = teacher(x, features=True)
    s = student(x, features=True)
    for epoch in (0, 200):
        decay = cosine_decay(epoch, 150, 240)
        loss, _, _ = obj(student, x, y, epoch=epoch)
        expected = (Fd.cross_entropy(s.logits, y) + wkd_logit(s.logits, t.logits, y, term.cost, 8.0, 600.0 * decay)
                    + 0.08 * decay * wkd_feature(term.regressor(s.stages[-1]), t.stages[-1], 4.0, 1))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    obj.train()
    loss, _, _ = obj(student, x, y)
    loss.backward()
    assert all(q.grad is not None for q in term.regressor.parameters()) and student.fc.weight.grad is not None


def test_wkd_feature_alone_and_its_bottleneck():
    obj, *_ = build("resnet14", "resnet8", ["wkd"], wkd={"beta": 0.0, "feat_weight": 0.3, "projector": "bottleneck"})
    assert not hasattr(obj.terms["wkd"], "cost") and [m.kernel_size for m in list(obj.terms["wkd"].regressor)[:3]] == [(1, 1), (3, 3), (1, 1)]
    with pytest.raises(ValueError, match="wkd: the bottleneck projector needs equal map sizes"):
        build("resnet14", "vgg8", ["wkd"], wkd={"feat_weight": 0.3, "projector": "bottleneck"})  # 4x4 vs 8x8
    obj, *_ = build("resnet14", "vgg8", ["wkd"], wkd={"feat_weight": 0.3})  # ConvReg: a transposed conv, as WKD's
    assert isinstance(obj.terms["wkd"].regressor[0], torch.nn.ConvTranspose2d)


# --- SDD (shicaiwei123/SDD-CVPR2024) -----------------------------------------------------------------------------
from kdpipe.distill import dkd as dkd_module  # noqa: E402
from kdpipe.distill.base import Shapes  # noqa: E402
from kdpipe.distill.sdd import SDD, _regions, sdd  # noqa: E402


def np_block_mean(x, out):
    """Adaptive average pooling written out: cell i spans floor(i H / out) to ceil((i + 1) H / out)."""
    b, c, h, w = x.shape
    y = np.zeros((b, c, out, out))
    for i in range(out):
        for j in range(out):
            y[:, :, i, j] = x[:, :, math.floor(i * h / out):math.ceil((i + 1) * h / out),
                              math.floor(j * w / out):math.ceil((j + 1) * w / out)].mean((2, 3))
    return y


def np_regions(x, levels):
    """SDD's SPP (mdistiller/models/cifar/utils.py:15-33): 4x4 first, each level from it; (B, C, regions)."""
    x4 = np_block_mean(np.asarray(x, dtype=np.float64), 4)
    return np.concatenate([np_block_mean(x4, level).reshape(x.shape[0], x.shape[1], -1) for level in levels], 2)


def np_sdd(s_regions, t_regions, y, base, alpha, beta, temp, comp):
    """KD.py:16-98 / SDD_DKD.py:9-124, region by region and sample by sample."""
    s_regions, t_regions = s_regions.double().numpy(), t_regions.double().numpy()
    n, b, k = s_regions.shape
    total = 0.0
    for r in range(n):
        for i in range(b):
            zs, zt, label = s_regions[r, i], t_regions[r, i], int(y[i])
            if base == "kd":
                row = np_kl(np_softmax(zt / temp), np_softmax(zs / temp)) * temp ** 2
            else:
                ps, pt = np_softmax(zs / temp), np_softmax(zt / temp)
                tckd = np_kl([pt[label], 1 - pt[label]], [ps[label], 1 - ps[label]])
                rest = [j for j in range(k) if j != label]
                nckd = np_kl(np_softmax(zt[rest] / temp), np_softmax(zs[rest] / temp))
                row = (alpha * tckd + beta * nckd) * temp ** 2
            local_right = int(np.argmax(zt)) == label
            global_right = int(np.argmax(t_regions[0, i])) == label
            total += (comp if local_right != global_right else 1.0) * row
    return total / (n * b)


def region_logits(seed, n=5, b=4, k=6):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, b, k, generator=g), 2 * torch.randn(n, b, k, generator=g)


@pytest.mark.parametrize("base, alpha, beta, temp, comp", [("dkd", 1.0, 8.0, 4.0, 2.0), ("kd", 1.0, 8.0, 4.0, 2.0),
                                                           ("dkd", 0.5, 2.0, 1.0, 3.0), ("kd", 1.0, 1.0, 2.0, 1.0)])
def test_sdd_matches_the_authors_region_losses(base, alpha, beta, temp, comp):
    s, t = region_logits(seed=8)
    y = torch.tensor([0, 1, 2, 3])
    t[0, 0, 0] = t[0, 1, 1] = 50.0  # the teacher's global prediction right on samples 0 and 1, wrong (likely) elsewhere
    t[1:, 2, 2] = 50.0  # and every local one right on sample 2: complementary regions on both sides
    got = sdd(s, t, y, base, alpha, beta, temp, comp).item()
    assert got == pytest.approx(np_sdd(s, t, y, base, alpha, beta, temp, comp), rel=1e-5)


def test_sdd_weighs_the_complementary_regions_by_hand():
    # two regions, one sample, label 0: the teacher's global region predicts 0 (right), its local one 1 (wrong)
    t = torch.tensor([[[3.0, 0.0]], [[0.0, 3.0]]])
    s = torch.zeros(2, 1, 2)
    y = torch.tensor([0])
    kd_rows = [Fd.kd(s[r], t[r], 1.0).item() for r in range(2)]
    assert sdd(s, t, y, "kd", temperature=1.0).item() == pytest.approx((kd_rows[0] + 2 * kd_rows[1]) / 2, rel=1e-6)
    assert sdd(s, t, y, "kd", temperature=1.0, complementary_weight=1.0).item() == pytest.approx(sum(kd_rows) / 2, rel=1e-6)


def test_sdd_at_one_scale_is_kd_or_dkd():
    s, t = rand_logits(seed=9)
    y = torch.arange(6)
    assert sdd(s[None], t[None], y, "kd").item() == pytest.approx(Fd.kd(s, t, 4.0).item(), rel=1e-6)
    assert sdd(s[None], t[None], y, "dkd", 1.0, 8.0).item() == pytest.approx(dkd_module.dkd(s, t, y).item(), rel=1e-6)


@pytest.mark.parametrize("size, levels", [(8, (1, 2, 4)), (7, (1, 2, 4)), (4, (1, 2)), (2, (1, 2, 4))])
def test_sdd_regions_are_the_authors_spp(size, levels):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    torch.testing.assert_close(_regions(x, levels).double(), torch.from_numpy(np_regions(x.numpy(), levels)),
                               rtol=1e-5, atol=1e-6)


def test_sdd_gradients_reach_the_student_regions():
    s, t = region_logits(seed=10)
    s.requires_grad_(True)
    sdd(s, t, torch.tensor([0, 1, 2, 3])).backward()
    assert torch.isfinite(s.grad).all() and (s.grad.abs().sum((1, 2)) > 0).all()  # every region


def test_sdd_defaults_are_the_authors():
    d = config.Distill().sdd
    assert d.base == "dkd" and d.levels == [1, 2, 4]  # README.md:41 `sdd_dkd/... --M [1,2,4]`
    assert (d.gamma, d.alpha) == (1.0, 0.0)  # mdistiller/engine/cfg.py:163 DKD.CE_WEIGHT 1.0
    assert (d.tckd, d.beta, d.temperature) == (1.0, 8.0, 4.0)  # cfg.py:164-166 DKD.ALPHA, BETA, T
    assert d.warmup_epochs == 20  # train_origin.py:198 --warmup default 20.0
    assert d.complementary_weight == 2.0  # SDD_DKD.py:114-115 and KD.py:89-90: index[gw_lt] = index[gt_lw] = 2
    with pytest.raises(config.ParamsError, match="levels"):
        config.validate(tiny_params(distill={"sdd": {"levels": [2, 4]}}))


@pytest.mark.parametrize("teacher_name, student_name, base", [("resnet14", "resnet8", "dkd"), ("wrn_16_2", "shufflev2", "kd"),
                                                              ("vgg11", "mobilenetv2", "dkd")])
def test_sdd_in_the_objective_classifies_each_models_regions(teacher_name, student_name, base):
    extra = {"base": base, "gamma": 0.1, "beta": 0.9} if base == "kd" else {}
    obj, teacher, student, p = build(teacher_name, student_name, ["sdd"], sdd=extra)
    assert obj.uses_classifier and obj.weights == {"sdd": 1.0}
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        t = teacher(x, features=True)
        s = student(x, features=True)
    heads = [models.classifier(m) for m in (student, teacher)]
    regions = [torch.from_numpy(np_regions(f.final.numpy(), (1, 2, 4))).float().permute(2, 0, 1) for f in (s, t)]
    s_reg, t_reg = [h(r) for h, r in zip(heads, regions)]  # (regions, B, classes)
    epoch, ramp = (4, 5 / 20) if base == "dkd" else (4, 0.9)
    expected = (0.1 if base == "kd" else 1.0) * Fd.cross_entropy(s.logits, y).item() \
        + ramp * np_sdd(s_reg.detach(), t_reg.detach(), y, base, 1.0, 8.0, 4.0, 2.0)
    loss, _, _ = obj(student, x, y, epoch=epoch)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # the SDD term alone trains the student's classifier and backbone (CE off), never the teacher
    obj, teacher, student, _ = build(teacher_name, student_name, ["sdd"], sdd={**extra, "gamma": 0.0})
    obj(student.train(), x, y, epoch=30)[0].backward()
    assert heads[0] is not None and models.classifier(student).weight.grad.abs().sum() > 0
    assert next(student.parameters()).grad.abs().sum() > 0 and all(q.grad is None for q in teacher.parameters())


def test_sdd_needs_the_final_map_of_both_models():
    shapes = Shapes([(3, 8, 8)], 3, (3, 8, 8))
    cfg = config.Distill().sdd
    with pytest.raises(ValueError, match="sdd .*teacher does not"):
        SDD(cfg, shapes, shapes._replace(final=None))
    SDD(cfg.model_copy(update={"levels": [1]}), shapes, shapes._replace(final=None))  # [1]: the logits alone


# --- in training: the engine's loop, checkpoints and resume -----------------------------------------------------
def test_sdd_and_wkd_train_and_resume_bit_identically(tmp_path):
    # SDD reads both models' classifiers through the engine's model (the loop's forward model), WKD-F's regressor is
    # optimised and checkpointed with the run, WKD-L's class cost is rebuilt from the teacher, never saved
    from kdpipe import engine

    from .conftest import distill_runs

    p = config.validate(tiny_params(student={"epochs": 2},
                                    distill={"sdd": {"warmup_epochs": 2}, "wkd": {"feat_weight": 0.08, "decay_start": 0,
                                                                                  "decay_end": 2}}))
    prepared, run = distill_runs(tmp_path, p, ["sdd", "wkd"])
    full = engine.train(run(tmp_path / "full.pt"), prepared)
    assert not any(k.startswith("terms") for k in full["state_dict"])  # the student alone
    losses = [row["loss_sdd"] for row in full["history"]]
    assert all(math.isfinite(v) and v > 0 for v in losses) and all(r["loss_wkd"] > 0 for r in full["history"])
    out = tmp_path / "cut.pt"
    with pytest.raises(KeyboardInterrupt):
        engine.train(run(out, 1), prepared)
    engine.train(run(out), prepared)
    assert out.read_bytes() == (tmp_path / "full.pt").read_bytes()
