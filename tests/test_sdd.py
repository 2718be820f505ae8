"""SDD (Wei et al., CVPR 2024; shicaiwei123/SDD-CVPR2024), and SDD and WKD in training: its loss against an
independent computation of its authors' loss (written out with numpy, in float64, sample by sample), its gradients,
and its defaults against the authors' code or configs (the comment beside each names the file and line)."""

import math

import numpy as np
import pytest
import torch

from kdpipe import config, models
from kdpipe.distill import functional as Fd
from kdpipe.distill import dkd as dkd_module
from kdpipe.distill.base import Shapes
from kdpipe.distill.sdd import SDD, _regions, sdd

from .conftest import tiny_params
from .reference import build, np_kl, np_softmax, rand_logits


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
