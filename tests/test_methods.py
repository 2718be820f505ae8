"""The methods RepDistiller benchmarks beyond the first five, and DKD: wiring, trainable parts, CRD's
memory bank and negative sampling, DKD's warm-up, and bit-identical resume."""

import math

import pytest
import torch

from kdpipe import config, engine, models
from kdpipe.distill import Distiller, TrainData, feature_shapes
from kdpipe.distill import functional as Fd
from kdpipe.distill.crd import NegativeSampler

from .conftest import distill_runs, tiny_params

NEW = ["sp", "cc", "vid", "rkd", "pkt", "crd", "dkd", "dist", "ctkd"]
LABELS = torch.arange(96) % 10


def build(methods, **distill_updates):
    distill = {"crd": {"nce_k": 32}, "dkd": {"warmup_epochs": 20}}  # DKD's default warm-up (tiny params: 1)
    p = config.validate(tiny_params(distill={**distill, **distill_updates}))
    torch.manual_seed(0)
    teacher, student = models.create("resnet14", 10), models.create("resnet8", 10)
    obj = Distiller(teacher, methods, p.distill, feature_shapes(student), feature_shapes(teacher), TrainData(LABELS))
    return obj, teacher, student, p


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(96, generator=g)[:n]
    return torch.randn(n, 3, 32, 32, generator=g), LABELS[index], index


@pytest.mark.parametrize("method", NEW)
def test_gradients_reach_student_and_method_parts_only(method):
    obj, teacher, student, _ = build([method])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.SGD(list(student.parameters()) + list(obj.parameters()), lr=0.01, momentum=0.9)
    student.train()
    obj.train()
    for step in range(2):
        x, y, index = batch(seed=step)
        loss, _ = obj(student, x, y, index=index, epoch=5)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert student.conv1.weight.grad is not None and student.conv1.weight.grad.abs().sum() > 0
        for name, p in obj.named_parameters():  # embeddings, regressors, VID's variances: all trained
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_default_weights_are_repdistillers_and_mdistillers():
    d = config.Distill()
    assert [getattr(d, m).beta for m in ("sp", "cc", "vid", "rkd", "pkt", "crd")] == [3000, 0.02, 1, 1, 30000, 0.8]
    assert (d.crd.feat_dim, d.crd.nce_k, d.crd.nce_t, d.crd.nce_m, d.cc.feat_dim) == (128, 16384, 0.07, 0.5, 128)
    assert (d.rkd.w_dist, d.rkd.w_angle) == (25, 50)
    assert (d.dkd.gamma, d.dkd.tckd, d.dkd.beta, d.dkd.temperature, d.dkd.warmup_epochs) == (1, 1, 8, 4, 20)
    assert all((getattr(d, m).gamma, getattr(d, m).alpha) == (1.0, 0.0) for m in NEW if m != "ctkd")
    assert (d.ctkd.gamma, d.ctkd.alpha, d.ctkd.beta) == (0.1, 0.0, 0.9)  # CTKD: -r 0.1 -a 0.9 on its learnable-T KD


def test_terms_compute_the_documented_losses():
    obj, teacher, student, p = build(["sp", "rkd", "pkt", "dkd"])
    x, y, index = batch()
    student.eval()  # same BN statistics in both calls
    loss, logits = obj(student, x, y, index=index, epoch=4)
    with torch.no_grad():
        tl, tf = teacher(x, features=True)
    sl, sf = student(x, features=True)
    es, et = sf[-1].mean((2, 3)), tf[-1].mean((2, 3))
    expected = (Fd.cross_entropy(sl, y) + 3000 * Fd.sp(sf[3], tf[3]) + Fd.rkd(es, et) + 30000 * Fd.pkt(es, et)
                + 5 / 20 * Fd.dkd(sl, tl, y, 1.0, 8.0, 4.0))  # DKD warm-up: epoch 5 (counted from 1) of 20
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert obj.weights["dkd"] == 1.0  # DKD weighs TCKD and NCKD inside


def test_dist_and_logit_standardisation_in_the_objective():
    # DIST: CE + beta (2: the authors' kd_loss_weight) x DIST(tau = temperature); logit_std standardises both
    # logits before a logit method's loss (kd, dkd, dist), never before CE
    obj, teacher, student, p = build(["kd", "dist"], kd={"logit_std": True, "temperature": 2.0, "alpha": 9.0},
                                     dist={"logit_std": False})
    x, y, index = batch()
    student.eval()
    loss, _ = obj(student, x, y, index=index)
    with torch.no_grad():
        tl = teacher(x)
    sl = student(x)
    z = lambda v: (v - v.mean(1, keepdim=True)) / (1e-7 + v.std(1, keepdim=True))  # noqa: E731  (Sun et al.'s normalize)
    expected = (p.distill.kd.gamma * Fd.cross_entropy(sl, y) + 9.0 * Fd.kd(z(sl), z(tl), 2.0)
                + 2.0 * Fd.dist(sl, tl, 1.0, 1.0, 4.0))
    assert obj.weights == {"kd": 9.0, "dist": 2.0} and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    obj, *_ = build(["dkd", "dist"], dkd={"logit_std": True}, dist={"logit_std": True, "temperature": 1.0})
    loss, _ = obj(student, x, y, index=index, epoch=30)
    expected = (Fd.cross_entropy(sl, y) + Fd.dkd(z(sl), z(tl), y, 1.0, 8.0, 4.0) + 2.0 * Fd.dist(z(sl), z(tl), 1.0, 1.0, 1.0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ctkd_curriculum_temperature():
    # zhengli97/CTKD: tau = 1 + 20 sigmoid(T), T = 1 at start; lambda = cosine 0 -> -1 over epochs 1..10 (then -1);
    # T's gradient is lambda times the KD loss's gradient (reversed: T makes KD harder), the student's is not reversed
    from kdpipe.distill.ctkd import cosine_lambda

    assert [round(cosine_lambda(e, 0.0, -1.0, 10), 5) for e in (1, 5, 10, 11, 240)] == [-0.02447, -0.5, -1.0, -1.0, -1.0]
    obj, teacher, student, p = build(["ctkd"])
    term = obj.terms["ctkd"]
    assert obj.gamma == 0.1 and obj.weights == {"ctkd": 0.9} and "kd" not in obj.terms
    assert term.temperature(0).item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)  # 15.62
    x, y, index = batch()
    student.eval()
    with torch.no_grad():
        tl = teacher(x)
    for epoch in (0, 4, 30):
        sl = student(x)
        loss, _ = obj(student, x, y, index=index, epoch=epoch)
        tau_param = term.global_t.detach().clone().requires_grad_(True)
        tau = 1 + 20 * torch.sigmoid(tau_param)
        expected = 0.1 * Fd.cross_entropy(sl, y) + 0.9 * Fd.kd(sl, tl, tau[0])
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        g_t, = torch.autograd.grad(loss, term.global_t, retain_graph=True)
        g_plain, = torch.autograd.grad(expected, tau_param, retain_graph=True)
        lam = cosine_lambda(epoch + 1, 0.0, -1.0, 10)
        torch.testing.assert_close(g_t, lam * g_plain)
        g_s, = torch.autograd.grad(loss, student.fc.weight)
        torch.testing.assert_close(g_s, torch.autograd.grad(expected, student.fc.weight)[0])


def test_dkd_warmup_is_linear_then_flat():
    obj, _, student, _ = build(["dkd"], dkd={"gamma": 0.0, "warmup_epochs": 20})
    student.eval()
    x, y, index = batch()
    full = obj(student, x, y, epoch=19)[0].item()
    assert obj(student, x, y, epoch=0)[0].item() == pytest.approx(full / 20, rel=1e-5)
    assert obj(student, x, y, epoch=9)[0].item() == pytest.approx(full / 2, rel=1e-5)
    assert obj(student, x, y, epoch=100)[0].item() == pytest.approx(full, rel=1e-6)


def test_negative_sampler_draws_only_other_classes_uniformly():
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 0, 1])
    sampler = NegativeSampler(labels, seed=3)
    index = torch.tensor([0, 3, 7])
    neg = sampler(index, 4000)
    for row, i in zip(neg, index):
        assert (labels[row] != labels[i]).all()
    counts = torch.bincount(neg[1], minlength=8).float()  # anchor of class 2: 5 other samples, ~800 each
    assert set(torch.nonzero(counts).flatten().tolist()) == {0, 1, 2, 6, 7}
    assert counts.max() / counts[counts > 0].min() < 1.2
    assert not torch.equal(sampler(index, 8), sampler(index, 8))  # the counter moves on


def test_crd_memory_update_and_normalisation_constants():
    obj, _, student, p = build(["crd"])
    crd = obj.terms["crd"]
    assert crd.memory_s.shape == (96, 128) and (crd.z < 0).all()
    x, y, index = batch()
    student.train()
    obj.train()
    old_s = crd.memory_s[index].clone()
    obj(student, x, y, index=index)
    z = crd.z.clone()
    assert (z > 0).all()
    with torch.no_grad():
        vs = crd.embed_s(student(x, features=True).embedding)
    # momentum 0.5 update, re-normalised (BN batch statistics make vs slightly differ: compare loosely)
    expected = torch.nn.functional.normalize(0.5 * old_s + 0.5 * vs, dim=1)
    torch.testing.assert_close(crd.memory_s[index], expected, rtol=0, atol=1e-2)
    obj(student, x, y, index=index)
    assert torch.equal(crd.z, z)  # Z is fixed after the first batch


def test_crd_needs_indices():
    obj, _, student, _ = build(["crd"])
    x, y, _ = batch()
    with pytest.raises(ValueError, match="index"):
        obj(student, x, y)


@pytest.mark.parametrize("methods", [["crd", "kd"], ["dkd"], ["vid"], ["dist"], ["ctkd"]])
def test_resume_is_bit_identical(tmp_path, methods):
    p = config.validate(tiny_params(student={"epochs": 3}, distill={"crd": {"nce_k": 32}, "dkd": {"warmup_epochs": 2}}))
    prepared, run = distill_runs(tmp_path, p, methods)
    full = engine.train(run(tmp_path / "full.pt"), prepared)
    assert not any(k.startswith("terms") for k in full["state_dict"])  # the student alone
    out = tmp_path / "cut.pt"
    with pytest.raises(KeyboardInterrupt):
        engine.train(run(out, 1), prepared)
    engine.train(run(out), prepared)
    assert out.read_bytes() == (tmp_path / "full.pt").read_bytes()


def test_crd_refuses_multi_process_runs(workdir):
    from typer.testing import CliRunner

    from kdpipe.cli import app

    result = CliRunner().invoke(app, ["distill", "-m", "crd+kd"], env={"WORLD_SIZE": "2"})
    assert result.exit_code == 2 and "crd under torchrun is not supported" in result.output


# CRD's 13 pairs (RepDistiller's README): every method that the pair admits runs one step on it
CRD_PAIRS = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
             ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("vgg13", "mobilenetv2"),
             ("resnet50", "mobilenetv2"), ("resnet50", "vgg8"), ("resnet32x4", "shufflev1"),
             ("resnet32x4", "shufflev2"), ("wrn_40_2", "shufflev1")]


@pytest.mark.parametrize("teacher_name, student_name", CRD_PAIRS)
def test_every_method_runs_on_every_crd_pair(teacher_name, student_name):
    torch.manual_seed(0)
    teacher, student = models.create(teacher_name, 100), models.create(student_name, 100)
    s_shapes, t_shapes = feature_shapes(student), feature_shapes(teacher)
    same_channels = [s[0] for s in s_shapes.stages] == [t[0] for t in t_shapes.stages]
    methods = [m for m in config.METHODS if m != "fsp" or same_channels]  # RepDistiller: FSP N/A across widths
    labels = torch.arange(200) % 100
    p = config.validate(tiny_params(distill={"crd": {"nce_k": 16}}))
    obj = Distiller(teacher, methods, p.distill, s_shapes, t_shapes, TrainData(labels))
    index = torch.arange(0, 200, 50)
    x = torch.randn(4, 3, 32, 32)
    loss, logits = obj(student.train(), x, labels[index], index=index)
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (4, 100)
    assert all(q.grad is not None for q in student.parameters())
    assert all(q.grad is None for q in teacher.parameters())
    if not same_channels:
        with pytest.raises(ValueError, match="fsp needs equal channel counts per tap"):
            Distiller(teacher, ["fsp"], p.distill, s_shapes, t_shapes)


def test_dkd_beta_per_pair():
    p = config.validate(tiny_params(distill={"dkd": {"beta": 8.0, "beta_by_pair": {"resnet56->resnet20": 2.0}}}))
    assert p.distill.for_pair("resnet56", "resnet20").dkd.beta == 2.0
    assert p.distill.for_pair("resnet110", "resnet20").dkd.beta == 8.0
    assert p.distill.for_pair("resnet56", "resnet20").kd == p.distill.kd
    with pytest.raises(config.ParamsError, match="beta_by_pair.*'resnet56-resnet20' is not 'teacher->student'"):
        config.validate(tiny_params(distill={"dkd": {"beta_by_pair": {"resnet56-resnet20": 2.0}}}))


def test_lr_by_model_applies_to_the_model_trained():
    lrs = {"mobilenetv2": 0.01, "shufflev1": 0.01}
    p = config.validate(tiny_params(student={"model": "shufflev1", "optim": {"lr": 0.05, "lr_by_model": lrs}},
                                    teacher={"model": "resnet32x4", "optim": {"lr": 0.05, "lr_by_model": lrs}}))
    assert p.student.lr == 0.01 and p.teacher.lr == 0.05
    assert engine.learning_rate(p.student, 0, 0, 10) == 0.01
    again = config.validate({**p.student.model_dump(), "model": "resnet8"}, config.Train)  # --model override
    assert again.lr == 0.05
