"""The methods' wiring into the objective (every method on a CIFAR pair): their trainable parts, CRD's memory bank
and negative sampling, DKD's warm-up, and bit-identical resume."""

import math

import pytest
import torch

from kdpipe import config, engine, models
from kdpipe.distill import Distiller, TrainData, feature_shapes
from kdpipe.distill import functional as Fd
from kdpipe.distill import dist, dkd, kdsvd, mlkd, ofd, pkt, reviewkd, rkd, sp
from kdpipe.distill.crd import NegativeSampler

from .conftest import distill_runs, tiny_params

# the methods without an init stage (FSP, AB and FT: tests/test_init_stages.py and test_distill.py)
ONE_PHASE = [m for m in config.METHODS if not getattr(config.Distill(), m).model_dump().get("init_epochs")]
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


@pytest.mark.parametrize("method", ONE_PHASE)
def test_gradients_reach_student_and_method_parts_only(method):
    obj, teacher, student, _ = build([method])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.SGD(list(student.parameters()) + list(obj.parameters()), lr=0.01, momentum=0.9)
    student.train()
    obj.train()
    for step in range(2):
        x, y, index = batch(seed=step)
        x = (x, x.flip(3)) if obj.views else x  # MLKD: a second view
        loss, _, _ = obj(student, x, y, index=index, epoch=5)
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
    assert all((getattr(d, m).gamma, getattr(d, m).alpha) == (1.0, 0.0) for m in config.METHODS if m not in ("kd", "ctkd", "dot", "mlkd"))
    assert (d.reviewkd.beta, d.reviewkd.warmup_epochs, d.reviewkd.stu_preact, d.kdsvd.beta, d.kdsvd.k) == (5, 20, False, 1, 1)
    assert (d.dot.gamma, d.dot.alpha, d.dot.temperature, d.dot.delta) == (0.1, 0.9, 4, 0.075)  # mdistiller's KD+DOT
    assert (d.ofd.gamma, d.ofd.beta) == (1, 0.001)  # mdistiller's CE_WEIGHT, FEAT_WEIGHT
    assert (d.mlkd.gamma, d.mlkd.beta, d.mlkd.temperature) == (0.1, 0.9, 4)  # MLKD's CE_WEIGHT, KD_WEIGHT, T
    assert (d.ctkd.gamma, d.ctkd.alpha, d.ctkd.beta) == (0.1, 0.0, 0.9)  # CTKD: -r 0.1 -a 0.9 on its learnable-T KD


def test_terms_compute_the_documented_losses():
    obj, teacher, student, p = build(["sp", "rkd", "pkt", "dkd"])
    x, y, index = batch()
    student.eval()  # same BN statistics in both calls
    loss, logits, _ = obj(student, x, y, index=index, epoch=4)
    with torch.no_grad():
        tl, tf = teacher(x, features=True)
    sl, sf = student(x, features=True)
    es, et = sf[-1].mean((2, 3)), tf[-1].mean((2, 3))
    expected = (Fd.cross_entropy(sl, y) + 3000 * sp.sp(sf[3], tf[3]) + rkd.rkd(es, et) + 30000 * pkt.pkt(es, et)
                + 5 / 20 * dkd.dkd(sl, tl, y, 1.0, 8.0, 4.0))  # DKD warm-up: epoch 5 (counted from 1) of 20
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert obj.weights["dkd"] == 1.0  # DKD weighs TCKD and NCKD inside


def test_dist_and_logit_standardisation_in_the_objective():
    # DIST: CE + beta (2: the authors' kd_loss_weight) x DIST(tau = temperature); logit_std standardises both
    # logits before a logit method's loss (kd, dkd, dist), never before CE
    obj, teacher, student, p = build(["kd", "dist"], kd={"logit_std": True, "temperature": 2.0, "alpha": 9.0},
                                     dist={"logit_std": False})
    x, y, index = batch()
    student.eval()
    loss, _, _ = obj(student, x, y, index=index)
    with torch.no_grad():
        tl = teacher(x)
    sl = student(x)
    z = lambda v: (v - v.mean(1, keepdim=True)) / (1e-7 + v.std(1, keepdim=True))  # noqa: E731  (Sun et al.'s normalize)
    expected = (p.distill.kd.gamma * Fd.cross_entropy(sl, y) + 9.0 * Fd.kd(z(sl), z(tl), 2.0)
                + 2.0 * dist.dist(sl, tl, 1.0, 1.0, 4.0))
    assert obj.weights == {"kd": 9.0, "dist": 2.0} and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    obj, *_ = build(["dkd", "dist"], dkd={"logit_std": True}, dist={"logit_std": True, "temperature": 1.0})
    loss, _, _ = obj(student, x, y, index=index, epoch=30)
    expected = (Fd.cross_entropy(sl, y) + dkd.dkd(z(sl), z(tl), y, 1.0, 8.0, 4.0) + 2.0 * dist.dist(z(sl), z(tl), 1.0, 1.0, 1.0))
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
        loss, _, _ = obj(student, x, y, index=index, epoch=epoch)
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
    # momentum 0.5 update, re-normalised: the same operations on the same embeddings (train-mode BN normalises by
    # the batch's own statistics, so the second forward gives the same vs), hence exactly equal
    expected = torch.nn.functional.normalize(0.5 * old_s + 0.5 * vs, dim=1)
    torch.testing.assert_close(crd.memory_s[index], expected, rtol=0, atol=0)
    obj(student, x, y, index=index)
    assert torch.equal(crd.z, z)  # Z is fixed after the first batch


def test_crd_needs_indices():
    obj, _, student, _ = build(["crd"])
    x, y, _ = batch()
    with pytest.raises(ValueError, match="index"):
        obj(student, x, y)


@pytest.mark.parametrize("methods", [["crd", "kd"], ["dkd"], ["vid"], ["dist"], ["ctkd"], ["reviewkd"], ["ofd"], ["mlkd"], ["kd", "dot"]])
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
    same_widths = all(s[2] == t[2] for s, t in zip(s_shapes.stages[1:], t_shapes.stages[1:]))
    # RepDistiller: FSP N/A across channel counts; mdistiller's KD-SVD needs equal map widths
    methods = [m for m in config.METHODS if (m != "fsp" or same_channels) and (m != "kdsvd" or same_widths)]
    labels = torch.arange(200) % 100
    p = config.validate(tiny_params(distill={"crd": {"nce_k": 16}}))
    index = torch.arange(0, 200, 50)
    x = torch.randn(4, 3, 32, 32)
    # every method at once, and OFD alone (it runs the teacher's BN on batch statistics)
    for chosen in ([m for m in methods if m != "ofd"], ["ofd"]):
        obj = Distiller(teacher, chosen, p.distill, s_shapes, t_shapes, TrainData(labels))
        student.zero_grad(set_to_none=True)
        loss, logits, _ = obj(student.train(), (x, x.flip(3)) if obj.views else x, labels[index], index=index)
        loss.backward()
        assert torch.isfinite(loss) and logits.shape == (4, 100)
        assert all(q.grad is not None for q in student.parameters())
        assert all(q.grad is None for q in teacher.parameters())
    if not same_channels:
        with pytest.raises(ValueError, match="fsp needs equal channel counts per tap"):
            Distiller(teacher, ["fsp"], p.distill, s_shapes, t_shapes)


def test_by_pair_sets_any_key_of_a_method_per_pair():
    p = config.validate(tiny_params(distill={"dkd": {"beta": 8.0, "by_pair": {"resnet56->resnet20": {"beta": 2.0}}},
                                             "sdd": {"by_pair": {"vgg13->vgg8": {"levels": [1, 2], "beta": 6}}}}))
    assert p.distill.for_pair("resnet56", "resnet20").dkd.beta == 2.0
    assert p.distill.for_pair("resnet110", "resnet20").dkd.beta == 8.0
    assert p.distill.for_pair("resnet56", "resnet20").kd == p.distill.kd
    sdd = p.distill.for_pair("vgg13", "vgg8").sdd
    assert (sdd.levels, sdd.beta, sdd.by_pair) == ([1, 2], 6.0, {})  # what the run records is what it used
    assert p.distill.for_pair("vgg13", "mobilenetv2").sdd.levels == [1, 2, 4]


@pytest.mark.parametrize("by_pair, message", [
    ({"resnet56-resnet20": {"beta": 2.0}}, "distill.dkd: by_pair: key 'resnet56-resnet20' is not 'teacher->student'"),
    ({"resnet56->resnet20": {"betta": 2.0}}, "by_pair.resnet56->resnet20: betta: not a key this method sets per pair"),
    ({"resnet56->resnet20": {"train": {}}}, "by_pair.resnet56->resnet20: train: not a key this method sets per pair"),
    ({"resnet56->resnet20": {"temperature": -1}}, "by_pair.resnet56->resnet20: temperature: Input should be greater "
                                                  "than 0"),
    ({"resnet56->resnet20": 2.0}, "distill.dkd.by_pair.resnet56->resnet20: Input should be a valid dictionary"),
])
def test_a_bad_by_pair_is_one_line_naming_it(by_pair, message):
    with pytest.raises(config.ParamsError) as e:
        config.validate(tiny_params(distill={"dkd": {"by_pair": by_pair}}))
    assert len(e.value.lines) == 1 and message in e.value.lines[0], e.value.lines


def test_lr_by_model_applies_to_the_model_trained():
    lrs = {"mobilenetv2": 0.01, "shufflev1": 0.01}
    p = config.validate(tiny_params(student={"model": "shufflev1", "optim": {"lr": 0.05, "lr_by_model": lrs}},
                                    teacher={"model": "resnet32x4", "optim": {"lr": 0.05, "lr_by_model": lrs}}))
    assert p.student.lr == 0.01 and p.teacher.lr == 0.05
    assert engine.learning_rate(p.student, 0, 0, 10) == 0.01
    again = config.validate({**p.student.model_dump(), "model": "resnet8"}, config.Train)  # --model override
    assert again.lr == 0.05


# --- ReviewKD, KD-SVD, DOT (mdistiller's implementations) --------------------------------------------------
def _pool(f, size):
    """Average over size x size blocks, written out (independent of adaptive_avg_pool2d)."""
    n, c, h, w = f.shape
    return f.reshape(n, c, size, h // size, size, w // size).mean((3, 5))


def test_hcl_weights_pooled_levels_as_mdistiller():
    # levels 4, 2, 1 used where smaller than the map's height, weights 1/2, 1/4, 1/8 of those used, / their sum
    g = torch.Generator().manual_seed(0)
    maps = [(torch.randn(2, 3, h, h, generator=g), torch.randn(2, 3, h, h, generator=g)) for h in (8, 4, 2, 1)]
    mse = lambda a, b: ((a - b) ** 2).mean().item()  # noqa: E731
    expected = [
        (mse(*maps[0]) + mse(_pool(maps[0][0], 4), _pool(maps[0][1], 4)) / 2 + mse(_pool(maps[0][0], 2), _pool(maps[0][1], 2)) / 4
         + mse(_pool(maps[0][0], 1), _pool(maps[0][1], 1)) / 8) / 1.875,
        (mse(*maps[1]) + mse(_pool(maps[1][0], 2), _pool(maps[1][1], 2)) / 2 + mse(_pool(maps[1][0], 1), _pool(maps[1][1], 1)) / 4) / 1.75,
        (mse(*maps[2]) + mse(_pool(maps[2][0], 1), _pool(maps[2][1], 1)) / 2) / 1.5,
        mse(*maps[3]),
    ]
    for (fs, ft), e in zip(maps, expected):
        assert reviewkd.hcl([fs], [ft]).item() == pytest.approx(e, rel=1e-6)
    assert reviewkd.hcl([m[0] for m in maps], [m[1] for m in maps]).item() == pytest.approx(sum(expected), rel=1e-6)


def test_reviewkd_levels_shapes_fusion_and_warmup():
    from kdpipe.distill.reviewkd import ABF

    obj, teacher, student, p = build(["reviewkd"])
    term = obj.terms["reviewkd"]
    s_shapes, t_shapes = feature_shapes(student), feature_shapes(teacher)
    # one ABF per teacher tap after its stem plus the pooled level; mid = min(512, student embedding)
    assert len(term.abfs) == len(t_shapes.stages) and term.abfs[-1].att_conv is None
    assert [a.conv1[0].in_channels for a in term.abfs] == [s[0] for s in s_shapes.stages[1:]] + [s_shapes.embedding]
    assert [a.conv2[0].out_channels for a in term.abfs] == [t[0] for t in t_shapes.stages[1:]] + [t_shapes.embedding]
    assert all(a.conv1[0].out_channels == min(512, s_shapes.embedding) for a in term.abfs)
    assert obj.gamma == 1.0 and obj.weights == {"reviewkd": 5.0}
    # fusion: attention (1, 0) keeps the level's own map, (0, 1) takes the deeper level's, nearest-upsampled
    abf = ABF(4, 6, 5, fuse=True).eval()
    x, deeper = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2)
    own = abf.conv1(x)
    for bias, expected in (([50.0, -50.0], own), ([-50.0, 50.0], deeper.repeat_interleave(2, 2).repeat_interleave(2, 3))):
        with torch.no_grad():
            abf.att_conv[0].weight.zero_()
            abf.att_conv[0].bias.copy_(torch.tensor(bias))
        out, fused = abf(x, deeper, (8, 8))  # then upsampled to the teacher's 8x8 before conv2
        torch.testing.assert_close(fused, expected.repeat_interleave(2, 2).repeat_interleave(2, 3))
        torch.testing.assert_close(out, abf.conv2(fused))
    # the loss against the teacher's pre-ReLU taps and embedding; weight ramps (epoch + 1) / 20
    x, y, index = batch()
    student.eval()
    obj.eval()
    with torch.no_grad():
        t = teacher(x, features=True)
        sf = student(x, features=True)
    outs, res = [], None
    feats = list(sf.stages[1:]) + [sf.embedding[:, :, None, None]]
    for i in reversed(range(len(feats))):
        o, res = term.abfs[i](feats[i], res, tuple(([u.shape[-2:] for u in t.preact[1:]] + [(1, 1)])[i]))
        outs.insert(0, o)
    targets = list(t.preact[1:]) + [t.embedding[:, :, None, None]]
    hcl = reviewkd.hcl(outs, targets).item()
    with torch.no_grad():
        for epoch, ramp in ((0, 1 / 20), (9, 10 / 20), (19, 1.0), (100, 1.0)):
            loss, _, _ = obj(student, x, y, epoch=epoch)
            assert loss.item() == pytest.approx(Fd.cross_entropy(sf.logits, y).item() + 5.0 * ramp * hcl, rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(t.preact, t.stages))  # it read the pre-ReLU taps


def _kdsvd_by_loops(s_feats, t_feats, k=1):
    """KD-SVD per sample with torch.svd (mdistiller's call), the matching student vector by argmax."""
    total = 0.0
    for i in range(s_feats[0].shape[0]):
        prev = None
        for fs, ft in zip(s_feats, t_feats):
            def vectors(f, n):
                c, h, w = f.shape[1:]
                _, sv, v = torch.svd(f[i].reshape(c * h, w))
                return sv[:n] / sv[:n].norm(), v[:, :n] / v[:, :n].norm(dim=0)
            s_t, v_t = vectors(ft, k)
            _, v_s = vectors(fs, k + 3)
            cos = v_s.t() @ v_t  # (k + 3, k)
            j = cos.abs().argmax(0)
            v_s = v_s[:, j] * cos[j, torch.arange(k)].sign()
            v_s, v_t = v_s * s_t, v_t * s_t
            if prev is not None:
                rbf = lambda a, b: torch.exp(-(a[:, None, :] - b[None, :, :]) ** 2 / 8)  # noqa: E731
                total = total + ((rbf(v_s, prev[0]) - rbf(v_t, prev[1])) ** 2).sum()
            prev = v_s, v_t
    return total / s_feats[0].shape[0]


def test_kdsvd_student_gradient_equals_the_per_sample_svds():
    # the student's singular vectors come from eigenvectors of Gram matrices: the loss's gradient is the SVD's
    obj, teacher, student, _ = build(["kdsvd"])
    x, _, _ = batch()
    with torch.no_grad():
        tf = teacher(x, features=True).stages[1:]
    sf = [f.detach().requires_grad_() for f in student(x, features=True).stages[1:]]
    ours = torch.autograd.grad(kdsvd.kdsvd(sf, tf, 1), sf)
    expected = torch.autograd.grad(_kdsvd_by_loops(sf, tf), sf)
    for a, b in zip(ours, expected):
        assert b.abs().max() > 0 and (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_kdsvd_against_per_sample_svd():
    obj, teacher, student, _ = build(["kdsvd"])
    x, y, index = batch()
    student.eval()
    with torch.no_grad():
        sf, tf = student(x, features=True).stages, teacher(x, features=True).stages
    expected = _kdsvd_by_loops(sf[1:], tf[1:]).item()
    assert kdsvd.kdsvd(sf[1:], tf[1:], 1).item() == pytest.approx(expected, rel=1e-4)
    loss, _, _ = obj(student, x, y)
    assert loss.item() == pytest.approx(Fd.cross_entropy(student(x), y).item() + expected, rel=1e-4)
    with pytest.raises(ValueError, match="kdsvd needs equal widths"):
        Distiller(teacher, ["kdsvd"], config.Distill(), feature_shapes(models.create("shufflev2", 10)),
                  feature_shapes(teacher))


def test_dot_optimiser_by_hand():
    # mdistiller's DistillationOrientedTrainer on three scalars: a both gradients, b the task's only, c the
    # distillation loss's only; momentum 0.9, delta 0.075, lr 0.1, weight decay 0.01, two steps
    from kdpipe.distill.dot import DistillationOrientedTrainer

    a, b, c = (torch.nn.Parameter(torch.tensor([v])) for v in (1.0, 2.0, 3.0))
    opt = DistillationOrientedTrainer([a, b, c], lr=0.1, momentum=0.9, delta=0.075, weight_decay=0.01)
    grads = [({"a": 0.5, "b": -1.0}, {"a": 2.0, "c": 4.0}), ({"a": -0.25, "b": 0.5}, {"a": 1.0, "c": -2.0})]
    pa, pb, pc = 1.0, 2.0, 3.0
    ta = tb = ka = kc = None
    for task, kd in grads:
        # losses linear in the parameters, whose gradients are these figures (b not in the distillation loss, c
        # not in the task's); the optimiser's own `backward(terms)` takes them apart: `ce`, and the other terms
        terms = {"ce": (task["a"] * a + task["b"] * b).sum(), "kd": (kd["a"] * a).sum(), "at": (kd["c"] * c).sum()}
        opt.zero_grad(set_to_none=True)
        loss = opt.backward(terms)
        opt.step()
        assert loss.item() == pytest.approx(sum(t.item() for t in terms.values()))
        # by hand: weight decay on the task gradient; c's distillation gradient gets it after its first step
        da, db = task["a"] + 0.01 * pa, task["b"] + 0.01 * pb
        ta = da if ta is None else (0.9 - 0.075) * ta + da
        tb = db if tb is None else 0.9 * tb + db  # one gradient: the mean momentum
        pa, pb = pa - 0.1 * ta, pb - 0.1 * tb
        ka = kd["a"] if ka is None else (0.9 + 0.075) * ka + kd["a"]
        kc = kd["c"] if kc is None else 0.9 * kc + kd["c"] + 0.01 * pc
        pa, pc = pa - 0.1 * ka, pc - 0.1 * kc
        assert (a.item(), b.item(), c.item()) == pytest.approx((pa, pb, pc), rel=1e-6)


def test_dot_steps_task_and_distillation_gradients_apart(tmp_path):
    # one engine step of kd+dot from fresh buffers: p - lr (g_task + wd p) - lr g_distill, with g_task of gamma CE
    # and g_distill of alpha KD; plain SGD would give the same first step, so the second shows the two momenta
    from kdpipe.distill.dot import DistillationOrientedTrainer

    obj, teacher, student, p = build(["kd", "dot"])
    assert "dot" not in obj.weights and obj.optimizer("init") is None
    cfg = p.student
    opt = engine.make_optimizer(list(student.parameters()), cfg, torch.device("cpu"), obj.optimizer("main"))
    assert isinstance(opt, DistillationOrientedTrainer)
    student.train()
    w = student.fc.weight
    bufs = {}
    for step in range(2):
        x, y, index = batch(seed=step)
        snap = {k: v.clone() for k, v in student.state_dict().items()}
        _, _, terms = obj(student, x, y)  # the task loss is `ce`, the distillation loss the other terms (kd)
        task, distill = terms["ce"], terms["kd"]
        g_task = torch.autograd.grad(task, w, retain_graph=True)[0] + cfg.optim.weight_decay * w.detach()
        g_kd = torch.autograd.grad(distill, w)[0]
        bt = g_task if step == 0 else (0.9 - 0.075) * bufs["t"] + g_task
        bk = g_kd if step == 0 else (0.9 + 0.075) * bufs["k"] + g_kd
        bufs = {"t": bt, "k": bk}
        expected = w.detach() - 0.02 * bt - 0.02 * bk
        student.load_state_dict(snap)  # the BN statistics as before this step's forward
        engine.train_step(obj, student, opt, x, y, "main", engine.Numerics.from_runtime(cfg.runtime), 0.02)
        torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(config.ParamsError, match="nesterov"):
        obj.optimizer("main")(list(student.parameters()), cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"nesterov": True})}))


def test_ofd_margin_by_hand():
    # E[x | x < 0] for x ~ N(beta, gamma^2): -gamma phi(beta/gamma) / Phi(-beta/gamma) + beta; -3|gamma| where
    # P(x < 0) <= 0.001
    gamma, beta = torch.tensor([1.0, -2.0, 1.0, 0.5, 1.0]), torch.tensor([0.0, 1.0, 4.0, -1.0, 2.5])
    phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda z: 0.5 * math.erfc(-z / math.sqrt(2))  # noqa: E731
    expected = [-phi(0) / 0.5, -2 * phi(0.5) / cdf(-0.5) + 1.0, -3.0, -0.5 * phi(2) / cdf(2) - 1.0,
                -phi(2.5) / cdf(-2.5) + 2.5]  # P(x < 0) = 0.0062: still the conditional mean
    assert ofd.ofd_margin(gamma, beta).tolist() == pytest.approx(expected, rel=1e-6)


def test_ofd_loss_elementwise():
    g = torch.Generator().manual_seed(0)
    s, t, m = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 4, 4, generator=g), torch.tensor([-0.5, -0.1, -1.0])
    t_pooled = t.reshape(2, 3, 2, 2, 2, 2).mean((3, 5))
    total = 0.0
    for idx in torch.cartesian_prod(*(torch.arange(k) for k in s.shape)).tolist():
        sv, tv, mv = s[tuple(idx)].item(), t_pooled[tuple(idx)].item(), m[idx[1]].item()
        if tv > 0 or (sv > tv > mv):  # the teacher's positive response, or above it while it is negative
            total += (sv - tv) ** 2
        elif sv > mv >= tv:  # teacher below its margin: only pull the student down to the margin
            total += (sv - mv) ** 2
    assert ofd.ofd([s], [t], [m]).item() == pytest.approx(total / 2, rel=1e-5)  # summed, mean over the batch
    zero = torch.zeros_like(s)  # a level that adds nothing shows the other's weight: 1/2 first, 1 last
    assert ofd.ofd([s, zero - 9], [t, t], [m, m]).item() == pytest.approx(0.5 * total / 2 + ofd.ofd([zero - 9], [t], [m]).item(), rel=1e-5)


def test_ofd_margins_levels_and_teacher_batch_statistics():
    obj, teacher, student, p = build(["ofd"])
    term = obj.terms["ofd"]
    with torch.no_grad():
        for bn in teacher.bn_before_relu():  # give the BNs distinct affine parameters
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    term.from_teacher(teacher)
    assert term.levels == 3 and obj.weights == {"ofd": 0.001} and obj.teacher_batch_stats
    for i, bn in enumerate(teacher.bn_before_relu()):
        torch.testing.assert_close(getattr(term, f"margin{i}"), ofd.ofd_margin(bn.weight, bn.bias))
    x, y, index = batch()
    running = {k: v.clone() for k, v in teacher.state_dict().items()}
    student.eval()
    obj.eval()
    loss, _, _ = obj(student, x, y)
    assert not teacher.training and all(torch.equal(v, running[k]) for k, v in teacher.state_dict().items())
    # the teacher's taps as a train-mode forward (batch statistics) of a copy gives them
    import copy

    twin = copy.deepcopy(teacher).train()
    with torch.no_grad():
        tp, sp_ = twin(x, features=True).preact, student(x, features=True).preact
        expected = Fd.cross_entropy(student(x), y) + 0.001 * ofd.ofd([c(f) for c, f in zip(term.connectors, sp_[1:])], tp[1:],
                                                                     [getattr(term, f"margin{i}") for i in range(3)])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="ofd takes its margins"):
        Distiller(models.create("mobilenetv2", 10), ["ofd"], config.Distill(), feature_shapes(student),
                  feature_shapes(models.create("mobilenetv2", 10)))


def _mlkd_by_hand(sw, tw, ss, ts, t0=4.0, logit_std=False):
    """MLKD's KD_ours.py written out with numpy's percentile, explicit KL sums and Gram matrices; `logit_std` as
    logit-standardization-KD's MLKD.py: its kd_loss on (z - mean) / (1e-7 + std) rows (std unbiased), the masks and
    the correlation terms on the raw logits."""
    import numpy as np

    def p(z, t):
        return torch.softmax(z.double() / t, 1)

    def standardised(z):
        z = z.double().numpy()
        return torch.from_numpy((z - z.mean(1, keepdims=True)) / (1e-7 + z.std(1, ddof=1, keepdims=True)))

    def kl(s, t, temp):  # sum_c p_t (log p_t - log p_s), batch mean, x T^2
        if logit_std:
            s, t = standardised(s), standardised(t)
        ps, pt = p(s, temp), p(t, temp)
        return (pt * (pt.log() - ps.log())).sum(1).mean().item() * temp ** 2

    temps = [t0, 3.0, 5.0, 2.0, 6.0]
    conf = p(tw, 1).max(1).values.numpy()
    mask = (conf <= np.percentile(conf, 50)).mean()
    cls = p(tw, 1).sum(0).numpy()
    cmask = (cls <= np.percentile(cls, 50)).mean()
    kd_weak = sum(kl(sw, tw, t) * mask for t in temps)
    kd_strong = kl(ss, ts, t0) + kl(ss, ts, 3) + kl(ss, ts, 5) + kl(sw, tw, 2) + kl(sw, tw, 6)
    cc = sum(((p(tw, t).T @ p(tw, t) - p(sw, t).T @ p(sw, t)) ** 2).sum().item() / sw.shape[1] * cmask for t in temps)
    bc = sum(((p(tw, t) @ p(tw, t).T - p(sw, t) @ p(sw, t).T) ** 2).sum().item() / sw.shape[0] * mask for t in temps)
    return kd_weak + kd_strong + cc + bc


@pytest.mark.parametrize("n", [8, 7])  # an odd batch: the "masks" keep (n + 1) / 2n of the samples
def test_mlkd_as_its_code_computes_it(n):
    g = torch.Generator().manual_seed(n)
    sw, tw, ss, ts = (torch.randn(n, 10, generator=g) * 3 for _ in range(4))
    # fp32 softmaxes and sums against float64: rounding only (seen: below 1e-6 relative)
    assert mlkd.mlkd(sw, tw, ss, ts, 4.0).item() == pytest.approx(_mlkd_by_hand(sw, tw, ss, ts), rel=2e-6)
    assert mlkd.mlkd(sw, tw, ss, ts, 2.0, logit_std=True).item() == \
        pytest.approx(_mlkd_by_hand(sw, tw, ss, ts, 2.0, logit_std=True), rel=2e-6)


def test_mlkd_in_the_objective_sees_both_views():
    obj, teacher, student, p = build(["mlkd"])
    assert obj.views == ("strong",) and obj.gamma == 0.1 and obj.weights == {"mlkd": 1.0}
    x, y, index = batch()
    xs = torch.flip(x, [3]) * 0.5
    student.eval()
    loss, logits, _ = obj(student, (x, xs), y, index=index)
    with torch.no_grad():
        tw, ts = teacher(x), teacher(xs)
    sw, ss = student(x), student(xs)
    expected = 0.1 * (Fd.cross_entropy(sw, y) + Fd.cross_entropy(ss, y)) + 0.9 * mlkd.mlkd(sw, tw, ss, ts, 4.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(logits, sw)


def test_dot_takes_gamma_from_the_method_it_trains_and_ofd_runs_alone():
    # dkd+dot and dot+dkd: CE 1 + DKD (dkd's gamma), no KD term added from dot's alpha
    for methods in (["dkd", "dot"], ["dot", "dkd"]):
        obj, *_ = build(methods)
        assert obj.gamma == 1.0 and obj.weights == {"dkd": 1.0} and obj.optimizer("main") is not None
    with pytest.raises(ValueError, match="ofd runs the teacher's BN on batch statistics"):
        build(["kd", "ofd"])


def test_ofd_and_reviewkd_pair_the_deepest_taps_of_unequal_models():
    # VGG-13 (5 taps) -> ResNet-8 (4): the three deepest teacher taps and their BNs; ReviewKD: the student's last four
    torch.manual_seed(0)
    teacher, student = models.create("vgg13", 10), models.create("resnet8", 10)
    with torch.no_grad():
        for bn in teacher.bn_before_relu():
            bn.bias.uniform_(-1, 1)
    p = config.validate(tiny_params())
    obj = Distiller(teacher, ["ofd"], p.distill, feature_shapes(student), feature_shapes(teacher))
    term = obj.terms["ofd"]
    assert term.levels == 3 and [c[0].out_channels for c in term.connectors] == [256, 512, 512]
    for i, bn in enumerate(teacher.bn_before_relu()[1:]):  # block2..block4
        torch.testing.assert_close(getattr(term, f"margin{i}"), ofd.ofd_margin(bn.weight, bn.bias))
    with pytest.raises(ValueError, match="reviewkd pairs the teacher's 4 taps"):
        Distiller(teacher, ["reviewkd"], p.distill, feature_shapes(student), feature_shapes(teacher))
    one_tap = feature_shapes(student)._replace(stages=feature_shapes(student).stages[:1])
    for method in ("ofd", "kdsvd"):
        with pytest.raises(ValueError, match=method):
            Distiller(teacher, [method], p.distill, one_tap, feature_shapes(teacher))
