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

from .conftest import tiny_params
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


# WKD's CKA class cost (COST_MATRIX 'cka'): tools/generate_class_proto.py, then tools/generate_cost_matrix.py
def np_linear_cka(x, y):
    """generate_cost_matrix.py:24-50's kernel form (linear_CKA): HSIC of the centred Gram matrices H X X^T H and
    H Y Y^T H, over the square roots of each one's HSIC with itself, in float64."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    kx, ky = h @ x @ x.T @ h, h @ y @ y.T @ h
    return (kx * ky).sum() / math.sqrt((kx * kx).sum()) / math.sqrt((ky * ky).sum())


def np_cka_cost(classes):
    return np.array([[1 - np_linear_cka(a, b) for b in classes] for a in classes])


def test_cka_cost_is_one_minus_the_linear_cka_of_each_two_classes():
    from kdpipe.distill.wkd import cka_cost

    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 5, generator=g)
    classes = [base + s * torch.randn(12, 5, generator=g) for s in (0.1, 0.5, 1.0, 3.0)]  # nearer to base, lower cost
    got = cka_cost(classes)
    want = np_cka_cost([c.double().numpy() for c in classes])
    assert torch.allclose(got.double(), torch.from_numpy(want), atol=1e-6)
    assert torch.equal(got, got.t()) and got.diagonal().abs().max() < 1e-6
    assert got[0, 1] < got[0, 2] < got[0, 3]  # the more alike two classes' features, the cheaper


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
    from .conftest import built_project

    return built_project(tmp_path_factory.mktemp("wkd"), tiny_params(), [("data",), ("teacher",)])


def independent_class_features(project, features):
    """The teacher's last stage map (or logits) of every training image in the prepared arrays' order, normalised as
    the manifest says, grouped by class, each image's positions as rows (C columns), cut to the smallest class."""
    import json

    import kdpipe
    from kdpipe import data

    prepared = data.load(project / "data/prepared")
    manifest = json.loads((project / "data/prepared/manifest.json").read_text())
    mean, std = (torch.tensor(manifest[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    model = kdpipe.load_model(project / "models/teacher.pt")
    with torch.no_grad():
        out = model((prepared.train.x.float() / 255 - mean) / std, features=True)
    f = out.stages[-1] if features == "stage" else out.logits
    rows = f.double().numpy()
    rows = rows.transpose(0, 2, 3, 1).reshape(len(rows), -1, rows.shape[1]) if rows.ndim == 4 else rows[:, None]
    y = prepared.train.y.numpy()
    m = min((y == c).sum() for c in range(10))
    return [rows[y == c][:m].reshape(-1, rows.shape[-1]) for c in range(10)]


@pytest.mark.parametrize("features", ["stage", "logits"])
def test_kdpipe_wkd_cost_is_the_cka_of_the_teachers_class_features(trained_teacher, tmp_path, monkeypatch, features):
    import hashlib

    from kdpipe.checkpoint import read_weights

    from .conftest import invoke, project_copy, tiny_params, write_params

    d = project_copy(trained_teacher, tmp_path, monkeypatch)
    write_params(d / "params.yaml", tiny_params(distill={"wkd": {"cka_features": features}}))
    invoke("wkd-cost")
    saved = read_weights(d / "models/teacher.wkd-cost.pt")
    want = np_cka_cost(independent_class_features(d, features))
    assert saved["cost"].shape == (10, 10) and saved["features"] == features
    assert np.allclose(saved["cost"].double().numpy(), want, atol=1e-5)
    assert saved["teacher_sha256"] == hashlib.sha256((d / "models/teacher.pt").read_bytes()).hexdigest()


def test_wkd_with_the_cka_cost_trains_on_the_file_and_refuses_a_wrong_one(trained_teacher, tmp_path, monkeypatch):
    import hashlib

    from kdpipe.checkpoint import atomic_save, load_checkpoint
    from kdpipe.distill.wkd import WKD, WKDParams

    from .conftest import invoke, project_copy, tiny_params, write_params

    d = project_copy(trained_teacher, tmp_path, monkeypatch)
    write_params(d / "params.yaml", tiny_params(distill={"wkd": {"cost": "cka", "decay_start": 1, "decay_end": 2}}))
    out = invoke("distill", "-m", "wkd", code=1)
    assert "models/teacher.wkd-cost.pt: not found" in out and "kdpipe wkd-cost" in out and "Traceback" not in out
    assert not (d / "models/wkd.pt").exists()
    invoke("wkd-cost")
    invoke("distill", "-m", "wkd")
    assert load_checkpoint(d / "models/wkd.pt")["meta"]["distill"]["wkd"]["cost"] == "cka"

    # the term reads the file sharpened (WKD.py:154-157), and only the file of its own teacher and features
    cost = torch.rand(10, 10)
    teacher = d / "models/teacher.pt"
    sha = hashlib.sha256(teacher.read_bytes()).hexdigest()
    for saved, error in (({"teacher_sha256": sha, "features": "stage"}, None),
                         ({"teacher_sha256": "0" * 64, "features": "stage"}, "computed for another teacher"),
                         ({"teacher_sha256": sha, "features": "logits"}, "distill.wkd.cka_features is stage")):
        atomic_save({"cost": cost, "computed": "test", **saved}, d / "models/teacher.wkd-cost.pt")
        term = WKD(WKDParams(cost="cka", cost_sharpen=2.0), None, None)
        if error is None:
            term.from_teacher(None, teacher)
            assert torch.allclose(term.cost, 1 - torch.exp(-2.0 * cost))
        else:
            with pytest.raises(Exception, match=error):
                term.from_teacher(None, teacher)


def test_wkd_cost_imports_the_authors_file_or_says_why_not(trained_teacher, tmp_path, monkeypatch):
    from kdpipe.checkpoint import read_weights

    from .conftest import invoke, project_copy

    d = project_copy(trained_teacher, tmp_path, monkeypatch)
    torch.save(torch.rand(9, 9), d / "linear_cka.pth")
    out = invoke("wkd-cost", "--import", "linear_cka.pth", code=1)
    assert "linear_cka.pth: not a 10 x 10 cost matrix" in out and not (d / "models/teacher.wkd-cost.pt").exists()
    authors = torch.rand(10, 10)
    torch.save(authors, d / "linear_cka.pth")
    invoke("wkd-cost", "--import", "linear_cka.pth")
    saved = read_weights(d / "models/teacher.wkd-cost.pt")
    assert torch.equal(saved["cost"], authors) and saved["imported"] == "linear_cka.pth"
