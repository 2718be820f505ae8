"""WTTM (Zheng & Yang, ICLR 2024; zkxufo/TTM): its loss against an independent computation of its authors' loss
(written out with numpy, in float64, sample by sample), its gradients, and its defaults against the authors' code
or configs (the comment beside each names the file and line)."""

import numpy as np
import pytest
import torch

from kdpipe import config
from kdpipe.distill import functional as Fd
from kdpipe.distill.wttm import wttm

from .reference import build, np_kl, np_softmax, rand_logits


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
