"""WKD (Lv et al., NeurIPS 2024; JiamingLv/WKD): WKD-L and WKD-F: its loss against an independent computation of its
authors' loss (written out with numpy, in float64, sample by sample), its gradients, and its defaults against the
authors' code or configs (the comment beside each names the file and line)."""

import math

import numpy as np
import pytest
import torch

from kdpipe import config
from kdpipe.distill import functional as Fd
from kdpipe.distill.wkd import cosine_decay, wkd_feature, wkd_logit

from .reference import build, np_softmax, rand_logits


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
