"""Each loss against an independent computation: explicit loops over samples/channels or closed forms."""

import math

import pytest
import torch

from kdpipe.distill import functional as Fd
from kdpipe.distill import at, cc, crd, dist, dkd, fsp, nst, pkt, rkd, sp, vid

torch.manual_seed(0)


def test_kd_hand_value():
    # p_t = (0.75, 0.25), p_s = (0.5, 0.5): KL = 0.75 ln 1.5 + 0.25 ln 0.5
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert Fd.kd(s, t, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # the same distributions at T = 2 (logits doubled) cost T^2 = 4 times as much
    assert Fd.kd(2 * s, 2 * t, 2.0).item() == pytest.approx(4 * expected, rel=1e-6)


def test_kd_matches_loop():
    s, t, T = torch.randn(5, 7), torch.randn(5, 7), 3.0
    total = 0.0
    for b in range(5):
        ps = [math.exp(v / T) for v in s[b].tolist()]
        pt = [math.exp(v / T) for v in t[b].tolist()]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    assert Fd.kd(s, t, T).item() == pytest.approx(total / 5 * T * T, rel=1e-5)
    assert Fd.kd(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


def _attention_loop(fs, ft, p):
    B, _, H, W = fs.shape
    total = 0.0
    for b in range(B):
        maps = []
        for f in (fs, ft):
            a = [sum(float(f[b, c, i, j]) ** p for c in range(f.shape[1])) / f.shape[1]
                 for i in range(H) for j in range(W)]
            norm = math.sqrt(sum(v * v for v in a))
            maps.append([v / norm for v in a])
        total += sum((x - y) ** 2 for x, y in zip(*maps))
    return total / (B * H * W)


@pytest.mark.parametrize("p", [2.0, 1.0, 4.0])
def test_attention_matches_loop(p):
    fs, ft = torch.rand(2, 3, 4, 4), torch.rand(2, 5, 4, 4)  # channel counts may differ
    assert at.attention(fs, ft, p).item() == pytest.approx(_attention_loop(fs, ft, p), rel=1e-5)


def test_attention_pools_the_larger_map():
    fs, ft = torch.rand(2, 3, 8, 8), torch.rand(2, 4, 4, 4)
    pooled = fs.view(2, 3, 4, 2, 4, 2).mean((3, 5))  # 2x2 average pooling, written out
    assert at.attention(fs, ft).item() == pytest.approx(_attention_loop(pooled, ft, 2), rel=1e-5)
    assert at.attention(ft, fs).item() == pytest.approx(_attention_loop(ft, pooled, 2), rel=1e-5)


def test_attention_properties():
    f = torch.rand(3, 4, 5, 5)
    assert at.attention(f, f).item() == pytest.approx(0, abs=1e-7)
    assert at.attention(f, 7 * f).item() == pytest.approx(0, abs=1e-7)  # scale-invariant (normalised maps)
    # orthogonal maps (disjoint supports) give the maximum: ||a - b||^2 = 2 per sample, over H*W positions
    a, b = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    a[0, 0, 0, 0], b[0, 0, 1, 1] = 1, 1
    assert at.attention(a, b).item() == pytest.approx(2 / 4)


def _nst_loop(fs, ft):
    def rows(f, b):
        r = [f[b, c].flatten().tolist() for c in range(f.shape[1])]
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in r]

    def kmean(x, y):
        return sum(sum(p * q for p, q in zip(u, v)) ** 2 for u in x for v in y) / (len(x) * len(y))

    B = fs.shape[0]
    return sum(kmean(rows(ft, b), rows(ft, b)) + kmean(rows(fs, b), rows(fs, b)) - 2 * kmean(rows(fs, b), rows(ft, b))
               for b in range(B)) / B


def test_nst_matches_loop():
    fs, ft = torch.rand(2, 3, 3, 3), torch.rand(2, 4, 3, 3)
    assert nst.nst(fs, ft).item() == pytest.approx(_nst_loop(fs, ft), rel=1e-5)


def test_nst_hand_value_and_properties():
    s, t = torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2)
    s[..., 0], t[..., 1] = 1, 1  # orthogonal single channels: K(t,t) = K(s,s) = 1, K(s,t) = 0
    assert nst.nst(s, t).item() == pytest.approx(2.0)
    f = torch.rand(2, 4, 3, 3)
    assert nst.nst(f, f).item() == pytest.approx(0, abs=1e-6)
    assert nst.nst(f, 3 * f).item() == pytest.approx(0, abs=1e-6)  # rows are normalised
    big = torch.rand(2, 4, 6, 6)
    pooled = big.view(2, 4, 3, 2, 3, 2).mean((3, 5))
    assert nst.nst(big, f).item() == pytest.approx(_nst_loop(pooled, f), rel=1e-5)


def test_fsp_matrix_hand_value_and_loop():
    bottom = torch.ones(1, 1, 2, 2)
    top = torch.cat([torch.ones(1, 1, 2, 2), 2 * torch.ones(1, 1, 2, 2)], 1)
    torch.testing.assert_close(fsp.fsp_matrix(bottom, top), torch.tensor([[[1.0], [2.0]]]))
    bottom, top = torch.rand(2, 3, 4, 4), torch.rand(2, 5, 2, 2)
    G = fsp.fsp_matrix(bottom, top)
    assert G.shape == (2, 5, 3)
    pooled = bottom.view(2, 3, 2, 2, 2, 2).mean((3, 5))
    for b in range(2):
        for i in range(5):
            for j in range(3):
                ref = (top[b, i] * pooled[b, j]).mean().item()
                assert G[b, i, j].item() == pytest.approx(ref, rel=1e-5)


def test_fsp_sums_consecutive_pairs():
    s = [torch.rand(2, 4, 8, 8), torch.rand(2, 4, 8, 8), torch.rand(2, 6, 4, 4), torch.rand(2, 8, 2, 2)]
    t = [torch.rand_like(f) for f in s]
    expected = sum(((fsp.fsp_matrix(s[i], s[i + 1]) - fsp.fsp_matrix(t[i], t[i + 1])) ** 2).mean() for i in range(3))
    assert fsp.fsp(s, t).item() == pytest.approx(expected.item(), rel=1e-6)
    assert fsp.fsp(s, s).item() == 0.0


def test_hint_is_mse():
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert Fd.hint(a, b).item() == pytest.approx((0 + 4 + 9 + 0) / 4)


# --- the methods RepDistiller benchmarks, and DKD ------------------------------------------------------
def _normalize(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_sp_matches_loop():
    fs, ft = torch.randn(4, 3, 2, 2), torch.randn(4, 5, 2, 2)  # channels may differ: Gram is B x B
    B = 4
    total = 0.0
    gs = [_normalize([float((fs[i] * fs[j]).sum()) for j in range(B)]) for i in range(B)]
    gt = [_normalize([float((ft[i] * ft[j]).sum()) for j in range(B)]) for i in range(B)]
    total = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(B) for j in range(B)) / B ** 2
    assert sp.sp(fs, ft).item() == pytest.approx(total, rel=1e-5)
    assert sp.sp(ft, ft).item() == 0.0


def test_pkt_matches_loop():
    es, et = torch.randn(5, 4), torch.randn(5, 6)
    def probs(e):
        e = [_normalize(row) for row in e.tolist()]
        sim = [[(sum(a * b for a, b in zip(e[i], e[j])) + 1) / 2 for j in range(5)] for i in range(5)]
        return [[v / sum(row) for v in row] for row in sim]
    ps, pt = probs(es), probs(et)
    expected = sum(pt[i][j] * math.log(pt[i][j] / ps[i][j]) for i in range(5) for j in range(5)) / 25
    assert pkt.pkt(es, et).item() == pytest.approx(expected, rel=1e-4)


def _huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_rkd_matches_loop():
    es, et = torch.randn(4, 3), torch.randn(4, 5)
    def dists(e):
        e = e.tolist()
        d = [[math.dist(e[i], e[j]) for j in range(4)] for i in range(4)]
        mean = sum(d[i][j] for i in range(4) for j in range(4) if i != j) / 12
        return [[v / mean for v in row] for row in d]
    def angles(e):
        e = e.tolist()
        out = []
        for a in range(4):
            for b in range(4):
                for c in range(4):
                    u = [x - y for x, y in zip(e[b], e[a])]
                    v = [x - y for x, y in zip(e[c], e[a])]
                    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
                    out.append(0.0 if nu == 0 or nv == 0 else sum(x * y for x, y in zip(u, v)) / (nu * nv))
        return out
    ds, dt = dists(es), dists(et)
    loss_d = sum(_huber(ds[i][j], dt[i][j]) for i in range(4) for j in range(4)) / 16
    loss_a = sum(_huber(a, b) for a, b in zip(angles(es), angles(et))) / 64
    assert rkd.rkd(es, et).item() == pytest.approx(25 * loss_d + 50 * loss_a, rel=1e-4)
    assert rkd.rkd(es, et, w_dist=1.0, w_angle=0.0).item() == pytest.approx(loss_d, rel=1e-4)


def test_cc_hand_value():
    es = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, 0.0]])
    et = torch.zeros(3, 2)
    # d = |es|: rows (1,2), (0,1), (3,0): pairs (0,1) -> 0*1 + 2*1 = 2, (1,2) -> 0*3 + 1*0 = 0; mean = 1
    assert cc.cc(es, et).item() == pytest.approx(1.0)


def test_dkd_matches_its_definition():
    s, t, y, T = torch.randn(6, 5), torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0]), 2.0
    tckd = nckd = 0.0
    for b in range(6):
        ps = [math.exp(v / T) for v in s[b].tolist()]
        pt = [math.exp(v / T) for v in t[b].tolist()]
        ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
        g = int(y[b])
        bs, bt = [ps[g], 1 - ps[g]], [pt[g], 1 - pt[g]]
        tckd += sum(q * math.log(q / p) for p, q in zip(bs, bt))
        qs = [v / (1 - ps[g]) for i, v in enumerate(ps) if i != g]
        qt = [v / (1 - pt[g]) for i, v in enumerate(pt) if i != g]
        nckd += sum(q * math.log(q / p) for p, q in zip(qs, qt))
    expected = (1.5 * tckd + 8.0 * nckd) / 6 * T * T
    assert dkd.dkd(s, t, y, alpha=1.5, beta=8.0, temperature=T).item() == pytest.approx(expected, rel=1e-4)
    # the paper's identity: KD = TCKD + (1 - p_t) NCKD, per sample; check it on one sample
    one = dkd.dkd(s[:1], t[:1], y[:1], 1.0, 0.0, T) + (1 - torch.softmax(t[:1] / T, 1)[0, y[0]]) * dkd.dkd(s[:1], t[:1], y[:1], 0.0, 1.0, T)
    assert one.item() == pytest.approx(Fd.kd(s[:1], t[:1], T).item(), rel=1e-4)


def test_vid_hand_value():
    mean, target = torch.zeros(1, 2, 1, 1), torch.tensor([[[[1.0]], [[2.0]]]])
    log_scale = torch.log(torch.expm1(torch.tensor([1.0, 4.0])))  # variances 1 and 4 (eps 0)
    expected = (0.5 * (1 / 1 + math.log(1)) + 0.5 * (4 / 4 + math.log(4))) / 2
    assert vid.vid(mean, target, log_scale, eps=0.0).item() == pytest.approx(expected, rel=1e-6)


def test_nce_and_contrast_scores_hand_values():
    # n_data 4, K = 2 negatives: m = K / N = 0.5; h(x) = x / (x + m)
    scores = torch.tensor([[1.0, 0.5, 1.5]])
    expected = -(math.log(1 / 1.5) + math.log(0.5 / 1.0) + math.log(0.5 / 2.0))
    assert crd.nce(scores, 4, eps=0.0).item() == pytest.approx(expected, rel=1e-6)
    anchor, memory = torch.tensor([[1.0, 0.0]]), torch.tensor([[7.0, 1.0], [0.5, 9.0], [-1.0, 3.0]])
    idx = torch.tensor([[1, 2, 1]])  # rows may repeat (negatives drawn with replacement)
    expected = torch.tensor([[math.exp(1.0), math.exp(-2.0), math.exp(1.0)]])
    torch.testing.assert_close(crd.contrast_scores(anchor, memory, idx, 0.5), expected)


def test_standardize_matches_statistics():
    # Sun et al. 2024's normalize: (z - mean) / (1e-7 + sample std), per row
    import statistics

    z = torch.randn(4, 9, dtype=torch.float64)
    got = Fd.standardize(z)
    for row, out in zip(z.tolist(), got.tolist()):
        m, sd = statistics.fmean(row), statistics.stdev(row)
        assert out == pytest.approx([(v - m) / (1e-7 + sd) for v in row], rel=1e-5)  # @fp32: computed in fp32
    # invariant to the logits' shift and scale: what the method is for
    torch.testing.assert_close(Fd.standardize(3 * z + 5), got)


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return num / (math.sqrt(sum((x - ma) ** 2 for x in a)) * math.sqrt(sum((y - mb) ** 2 for y in b)))


def test_dist_matches_loops_over_samples_and_classes():
    # DIST: 1 - mean Pearson over samples (each row of p = softmax(z/tau)) and over classes (each column)
    s, t, tau = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64), 4.0
    ps, pt = torch.softmax(s / tau, 1).tolist(), torch.softmax(t / tau, 1).tolist()
    inter = 1 - sum(_pearson(a, b) for a, b in zip(ps, pt)) / 6
    cols = lambda p: [list(c) for c in zip(*p)]  # noqa: E731
    intra = 1 - sum(_pearson(a, b) for a, b in zip(cols(ps), cols(pt))) / 5
    assert dist.dist(s, t, 2.0, 3.0, tau).item() == pytest.approx(tau ** 2 * (2.0 * inter + 3.0 * intra), rel=1e-5)
    assert dist.dist(t, t, 1.0, 1.0, tau).item() == pytest.approx(0.0, abs=1e-3)  # the reference's +1e-8 on small norms
