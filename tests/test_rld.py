"""RLD (ICCV 2025; zju-SWJ/RLD): its loss against an independent computation of its authors' loss (written out with
numpy, in float64, sample by sample), its gradients, and its defaults against the authors' code or configs (the
comment beside each names the file and line)."""

import math

import numpy as np
import pytest
import torch

from kdpipe import config
from kdpipe.distill import functional as Fd
from kdpipe.distill.rld import rld

from .reference import build, np_kl, np_softmax, rand_logits


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
