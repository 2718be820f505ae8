"""CRD (Tian et al. 2020) against an independent computation written from RepDistiller's `crd/memory.py`
(ContrastMemory) and `crd/criterion.py` (CRDLoss, ContrastLoss, Embed): loops over samples and contrast indices in
float64, none of kdpipe's functions. Three consecutive steps with the same contrast indices (the samples overlap,
so a step reads rows the previous one wrote): the loss, the gradients to the student's and the teacher's features
and to both embedding heads, both memory banks after their momentum update, and the normalisation constants Z."""

import math

import pytest
import torch

from kdpipe import config
from kdpipe.distill.base import Batch, Shapes, TrainData
from kdpipe.distill.crd import ContrastiveRepresentation
from kdpipe.models.base import Features

N, K, S_DIM, T_DIM, FEAT = 40, 6, 12, 20, 16
LABELS = torch.arange(N) % 4
EPS = 1e-7  # ContrastLoss's eps


class FixedNegatives(torch.nn.Module):
    """Stands in for the sampler: the contrast indices of each step, given (RepDistiller's `contrast_idx`)."""

    def __init__(self, negatives):
        super().__init__()
        self.negatives = list(negatives)

    def forward(self, index, k):
        return self.negatives.pop(0)


class RepDistillerCRD:
    """crd/criterion.py + crd/memory.py, written out: v1 = student, v2 = teacher. memory_v1 (the student's bank) is
    read by the teacher's anchor, memory_v2 by the student's; Z_v1 is fixed from the student-anchor scores."""

    def __init__(self, term: ContrastiveRepresentation, n_data, k, t, momentum):
        self.w_s = term.embed_s.linear.weight.detach().double().clone().requires_grad_()
        self.b_s = term.embed_s.linear.bias.detach().double().clone().requires_grad_()
        self.w_t = term.embed_t.linear.weight.detach().double().clone().requires_grad_()
        self.b_t = term.embed_t.linear.bias.detach().double().clone().requires_grad_()
        self.memory_v1 = term.memory_s.double().clone()
        self.memory_v2 = term.memory_t.double().clone()
        self.n_data, self.k, self.t, self.momentum = n_data, k, t, momentum
        self.z_v1 = self.z_v2 = -1.0

    @staticmethod
    def embed(f, w, b):  # Embed: linear, then Normalize (x / ||x||_2), row by row
        rows = []
        for x in f:
            out = torch.stack([sum(w[o, i] * x[i] for i in range(len(x))) + b[o] for o in range(len(b))])
            rows.append(out / torch.sqrt(sum(v * v for v in out)))
        return torch.stack(rows)

    def contrast_loss(self, x):  # ContrastLoss: x (B, K + 1), the positive first
        m, pn = x.shape[1] - 1, 1.0 / self.n_data
        total = 0.0
        for row in x:
            total = total + torch.log(row[0] / (row[0] + m * pn + EPS))
            for j in range(1, m + 1):
                total = total + torch.log(torch.tensor(m * pn, dtype=torch.float64) / (row[j] + m * pn + EPS))
        return -total / x.shape[0]

    def step(self, f_s, f_t, y, contrast_idx):
        v1, v2 = self.embed(f_s, self.w_s, self.b_s), self.embed(f_t, self.w_t, self.b_t)
        weight_v1, weight_v2 = self.memory_v1.clone(), self.memory_v2.clone()  # index_select(...).detach(): copies
        out_v1 = torch.stack([torch.stack([torch.exp(sum(weight_v2[j, d] * v1[b, d] for d in range(v1.shape[1]))
                                                     / self.t) for j in contrast_idx[b]]) for b in range(len(y))])
        out_v2 = torch.stack([torch.stack([torch.exp(sum(weight_v1[j, d] * v2[b, d] for d in range(v2.shape[1]))
                                                     / self.t) for j in contrast_idx[b]]) for b in range(len(y))])
        if self.z_v1 < 0:
            self.z_v1 = out_v1.detach().mean().item() * self.n_data
        if self.z_v2 < 0:
            self.z_v2 = out_v2.detach().mean().item() * self.n_data
        out_s, out_t = out_v1 / self.z_v1, out_v2 / self.z_v2
        with torch.no_grad():  # the momentum update of each anchor's own row, re-normalised
            for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                for b, i in enumerate(y.tolist()):
                    row = memory[i] * self.momentum + v[b] * (1 - self.momentum)
                    memory[i] = row / math.sqrt(float((row * row).sum()))
        return self.contrast_loss(out_s) + self.contrast_loss(out_t)


def steps(seed=0, n_steps=3, batch=5):
    """Each step's features, sample indices (overlapping across steps) and negatives of other classes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        index = torch.randperm(12, generator=g)[:batch]  # 12 of the 40 samples: rows are revisited
        neg = torch.stack([torch.nonzero(LABELS != LABELS[i]).flatten()[torch.randint(30, (K,), generator=g)]
                           for i in index])
        out.append((torch.randn(batch, S_DIM, generator=g), torch.randn(batch, T_DIM, generator=g), index, neg))
    return out


@pytest.mark.parametrize("momentum", [0.5, 0.8])  # RepDistiller's default, and one where old and new weigh apart
def test_crd_equals_repdistillers_over_three_steps(momentum):
    torch.manual_seed(0)
    cfg = config.Distill(crd={"nce_k": K, "feat_dim": FEAT, "nce_m": momentum}).crd
    term = ContrastiveRepresentation(cfg, Shapes([], S_DIM), Shapes([], T_DIM), TrainData(LABELS)).train()
    data = steps()
    term.sampler = FixedNegatives(neg for *_, neg in data)
    ref = RepDistillerCRD(term, N, K, cfg.nce_t, cfg.nce_m)
    close = dict(rtol=1e-6, atol=1e-6)  # fp32 against float64: single-precision rounding (seen: 3e-7), nothing more
    for f_s, f_t, index, neg in data:
        f_s32, f_t32 = f_s.clone().requires_grad_(), f_t.clone().requires_grad_()
        term.zero_grad()
        loss = term(Batch(Features(None, [], f_s32), Features(None, [], f_t32), LABELS[index], index))
        loss.backward()
        f_s64, f_t64 = f_s.double().requires_grad_(), f_t.double().requires_grad_()
        ref_loss = ref.step(f_s64, f_t64, index, torch.cat([index[:, None], neg], 1))
        ref_loss.backward()
        torch.testing.assert_close(loss.double(), ref_loss.detach(), **close)
        torch.testing.assert_close(term.z.double(), torch.tensor([ref.z_v1, ref.z_v2], dtype=torch.float64), **close)
        torch.testing.assert_close(term.memory_s.double(), ref.memory_v1, **close)
        torch.testing.assert_close(term.memory_t.double(), ref.memory_v2, **close)
        for got, want in ((f_s32.grad, f_s64.grad), (f_t32.grad, f_t64.grad),
                          (term.embed_s.linear.weight.grad, ref.w_s.grad), (term.embed_s.linear.bias.grad, ref.b_s.grad),
                          (term.embed_t.linear.weight.grad, ref.w_t.grad), (term.embed_t.linear.bias.grad, ref.b_t.grad)):
            torch.testing.assert_close(got.double(), want, **close)
            want.zero_()
        assert loss.item() > 0


def test_crd_without_momentum_update_in_eval_mode():
    """RepDistiller updates the banks in every forward; kdpipe only in training (evaluation must not write)."""
    torch.manual_seed(0)
    cfg = config.Distill(crd={"nce_k": K, "feat_dim": FEAT}).crd
    term = ContrastiveRepresentation(cfg, Shapes([], S_DIM), Shapes([], T_DIM), TrainData(LABELS)).eval()
    before = (term.memory_s.clone(), term.memory_t.clone())
    f_s, f_t, index, neg = steps(n_steps=1)[0]
    term.sampler = FixedNegatives([neg])
    term(Batch(Features(None, [], f_s), Features(None, [], f_t), LABELS[index], index))
    assert torch.equal(term.memory_s, before[0]) and torch.equal(term.memory_t, before[1])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_crd_memory_rows_are_unit_vectors_and_only_the_batch_rows_move(momentum):
    torch.manual_seed(1)
    cfg = config.Distill(crd={"nce_k": K, "feat_dim": FEAT, "nce_m": momentum}).crd
    term = ContrastiveRepresentation(cfg, Shapes([], S_DIM), Shapes([], T_DIM), TrainData(LABELS)).train()
    f_s, f_t, index, neg = steps(seed=2, n_steps=1)[0]
    term.sampler = FixedNegatives([neg])
    before = term.memory_s.clone()
    term(Batch(Features(None, [], f_s), Features(None, [], f_t), LABELS[index], index))
    moved = (term.memory_s != before).any(1)
    assert moved.nonzero().flatten().sort().values.tolist() == index.sort().values.tolist()
    torch.testing.assert_close(term.memory_s[index].norm(dim=1), torch.ones(len(index)), rtol=0, atol=1e-6)


def test_negatives_are_drawn_as_repdistillers_choice():
    """`np.random.choice(cls_negative[target], k, replace=k > len(cls_negative[target]))`: other classes only; a
    row's k negatives distinct where its class has at least k, uniform over them (each candidate's share within 10 %
    of k / candidates over 600 draws), and with replacement where it has fewer."""
    from kdpipe.distill.crd import NegativeSampler

    labels = torch.tensor([0] * 30 + [1] * 50 + [2] * 20)  # 70, 50 and 80 negatives
    sampler = NegativeSampler(labels, seed=3)
    index = torch.tensor([0, 35, 90, 5, 60])
    counts = torch.zeros(len(index), len(labels))
    for _ in range(600):
        neg = sampler(index, 40)
        assert (labels[neg] != labels[index][:, None]).all()
        assert all(len(set(row.tolist())) == 40 for row in neg)  # without replacement: 40 <= every class's negatives
        counts.scatter_add_(1, neg, torch.ones_like(neg, dtype=torch.float))
    for row, i in enumerate(index):
        candidates = labels != labels[i]
        share = counts[row, candidates] / 600
        expected = 40 / int(candidates.sum())
        assert (share - expected).abs().max() < 0.1 * expected + 0.05, (row, share.min(), share.max(), expected)
        assert counts[row, ~candidates].sum() == 0
    # 60 negatives: class 1 (50 negatives) draws with replacement, the others without
    neg = sampler(index, 60)
    assert [len(set(row.tolist())) == 60 for row in neg] == [True, False, True, True, False]
    assert (labels[neg] != labels[index][:, None]).all()
