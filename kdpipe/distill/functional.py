"""The distillation losses as pure functions (public API). Each returns a scalar tensor.

Features are the stage maps (`stages`, e.g. `[f0, f1, f2, f3]`) and the pooled `embedding` of `model(x, features=True)`. Conventions follow the papers
as implemented in the CIFAR distillation literature (RepDistiller), so results compare with its tables.

Every loss is decorated with `@fp32` (kdpipe/losses.py): it computes in fp32 whatever autocast region
it is called from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..losses import cross_entropy, fp32  # noqa: F401  (cross_entropy: the CE term, public here too)

Tensor = torch.Tensor


@fp32
def kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. 2015: KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over the
    batch ("batchmean"), times T^2 so that gradients keep their scale as T changes."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature ** 2


def match_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the spatially larger of two feature maps to the smaller one's size."""
    ha, hb = a.shape[-2:], b.shape[-2:]
    if ha[0] * ha[1] > hb[0] * hb[1]:
        a = F.adaptive_avg_pool2d(a, hb)
    elif hb[0] * hb[1] > ha[0] * ha[1]:
        b = F.adaptive_avg_pool2d(b, ha)
    return a, b


@fp32
def attention_map(f: Tensor, p: float = 2) -> Tensor:
    """Zagoruyko & Komodakis 2017: mean over channels of f^p, flattened per sample, L2-normalised."""
    return F.normalize(f.pow(p).mean(1).flatten(1), dim=1)


@fp32
def attention(fs: Tensor, ft: Tensor, p: float = 2) -> Tensor:
    """Attention transfer between two feature maps: mean over batch and positions of (a_s - a_t)^2."""
    fs, ft = match_spatial(fs, ft)
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()


def _poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over batch and all channel pairs (i, j) of k(a_i, b_j) = (a_i . b_j)^2."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


@fp32
def nst(fs: Tensor, ft: Tensor) -> Tensor:
    """Huang & Wang 2017, neural selectivity transfer: squared MMD with the polynomial kernel
    k(x, y) = (x^T y)^2 between the L2-normalised channel rows (over H*W) of each sample."""
    fs, ft = match_spatial(fs, ft)
    s = F.normalize(fs.flatten(2), dim=2)
    t = F.normalize(ft.flatten(2), dim=2)
    return _poly_kernel_mean(t, t) + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(s, t)


@fp32
def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """Yim et al. 2017: G[b, i, j] = mean over positions of top[b, i] * bottom[b, j], (B, C_top, C_bottom)."""
    bottom, top = match_spatial(bottom, top)
    return torch.bmm(top.flatten(2), bottom.flatten(2).transpose(1, 2)) / (top.shape[2] * top.shape[3])


@fp32
def fsp(s_feats: list[Tensor], t_feats: list[Tensor]) -> Tensor:
    """Sum over the consecutive tap pairs (f0,f1), (f1,f2), (f2,f3) of mean (G_s - G_t)^2."""
    return sum((fsp_matrix(s_feats[i], s_feats[i + 1]) - fsp_matrix(t_feats[i], t_feats[i + 1])).pow(2).mean()
               for i in range(len(s_feats) - 1))


@fp32
def hint(fs_regressed: Tensor, ft: Tensor) -> Tensor:
    """Romero et al. 2015 (FitNets): mean squared error between the regressed student hint and the teacher's."""
    return F.mse_loss(fs_regressed, ft)


# --- relational and embedding methods (RepDistiller's distiller_zoo; mdistiller's DKD) -------------------
@fp32
def sp(fs: Tensor, ft: Tensor) -> Tensor:
    """Tung & Mori 2019, similarity-preserving: the batch Gram matrices G = f f^T of the flattened maps,
    each row L2-normalised; sum of squared differences / B^2."""
    b = fs.shape[0]
    gs = F.normalize(fs.reshape(b, -1) @ fs.reshape(b, -1).t(), dim=1)
    gt = F.normalize(ft.reshape(b, -1) @ ft.reshape(b, -1).t(), dim=1)
    return (gt - gs).pow(2).sum() / (b * b)


@fp32
def pkt(es: Tensor, et: Tensor, eps: float = 1e-7) -> Tensor:
    """Passalis & Tefas 2018, probabilistic knowledge transfer: cosine similarities mapped to [0, 1] and
    row-normalised into conditional probabilities; mean over all B^2 entries of p_t log(p_t / p_s)."""
    def probabilities(e):
        e = e / (e.norm(dim=1, keepdim=True) + eps)
        e = torch.nan_to_num(e, nan=0.0)
        sim = (e @ e.t() + 1.0) / 2.0
        return sim / sim.sum(dim=1, keepdim=True)

    ps, pt = probabilities(es), probabilities(et)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


def _pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))  # exact zeros on the diagonal


def _angles(e: Tensor) -> Tensor:
    """cos of the angle at j between i and k, for all (j, i, k): <e_i - e_j, e_k - e_j> normalised."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


@fp32
def rkd(es: Tensor, et: Tensor, w_dist: float = 25.0, w_angle: float = 50.0) -> Tensor:
    """Park et al. 2019, relational KD: Huber (smooth L1) between the students' and teachers' pairwise
    distances (each divided by its mean non-zero distance) times w_dist, plus between their angle
    cosines of all triplets times w_angle. The teacher side carries no gradient."""
    es, et = es.flatten(1), et.flatten(1).detach()
    ds, dt = _pairwise_distances(es), _pairwise_distances(et)
    ds, dt = ds / ds[ds > 0].mean(), dt / dt[dt > 0].mean()
    return w_dist * F.smooth_l1_loss(ds, dt) + w_angle * F.smooth_l1_loss(_angles(es), _angles(et))


@fp32
def cc(es: Tensor, et: Tensor) -> Tensor:
    """Peng et al. 2019, correlation congruence as RepDistiller implements it (the authors' code): with
    d = |e_s - e_t|, the mean over consecutive sample pairs (i, i+1) of sum_k d_ik d_(i+1)k."""
    d = (es - et).abs()
    return (d[:-1] * d[1:]).sum(1).mean()


@fp32
def dkd(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0,
        temperature: float = 4.0) -> Tensor:
    """Zhao et al. 2022, decoupled KD: alpha * TCKD + beta * NCKD, each a KL divergence times T^2, batch
    mean. TCKD: binary (target vs all non-target) probabilities; NCKD: the distribution over the
    non-target classes alone (target logit removed)."""
    t = temperature
    gt = F.one_hot(target, student_logits.shape[1]).bool()
    ps, pt = F.softmax(student_logits / t, 1), F.softmax(teacher_logits / t, 1)
    bs = torch.stack([ps[gt], ps.masked_fill(gt, 0).sum(1)], 1)
    bt = torch.stack([pt[gt], pt.masked_fill(gt, 0).sum(1)], 1)
    tckd = F.kl_div(bs.log(), bt, reduction="batchmean")
    # as mdistiller: subtracting 1000 from the target logit removes it from the softmax (exp(-1000) = 0)
    log_qs = F.log_softmax(student_logits / t - 1000.0 * gt, 1)
    qt = F.softmax(teacher_logits / t - 1000.0 * gt, 1)
    nckd = F.kl_div(log_qs, qt, reduction="batchmean")
    return (alpha * tckd + beta * nckd) * t * t


@fp32
def vid(mean: Tensor, target: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    """Ahn et al. 2019: Gaussian negative log-likelihood (without the constant) of the teacher's map under
    the predicted mean and per-channel variance softplus(log_scale) + eps, mean over all elements."""
    var = (F.softplus(log_scale) + eps).view(1, -1, 1, 1)
    return (0.5 * ((mean - target).pow(2) / var + var.log())).mean()


@fp32
def nce(scores: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    """CRD's contrastive (NCE) loss, Eq. 18: `scores` (B, 1 + K) are exp(<u, v> / T) / Z with the positive
    first; with noise probability P_n = 1 / n_data, -(sum log h(pos) + sum log(1 - h(neg))) / B where
    h(x) = x / (x + K P_n)."""
    k = scores.shape[1] - 1
    m = k / n_data
    pos, neg = scores[:, 0], scores[:, 1:]
    return -((pos / (pos + m + eps)).log().sum() + (m / (neg + m + eps)).log().sum()) / scores.shape[0]


@fp32
def contrast_scores(anchor: Tensor, memory: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """CRD's unnormalised scores exp(<memory[idx[b, j]], anchor[b]> / T), (B, 1 + K), for anchors (B, D),
    a memory bank (N, D) and sampled indices (B, 1 + K). Computed as one (B, N) matrix product and a
    gather of the sampled scores: a GEMM instead of gathering B x (1 + K) x D memory rows, which made
    the memory traffic dominate the step (same dot products)."""
    return torch.exp((anchor @ memory.t()).gather(1, idx) / temperature)


@fp32
def ab(gs: list[Tensor], gt: list[Tensor], margin: float = 1.0) -> Tensor:
    """Heo et al. 2019 (AB), as RepDistiller's ABLoss: per layer, the alternative L2 loss on the (connected)
    student pre-activation s and the teacher's t, sum over elements of
    (s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0];
    layer i of n weighted 2^(i - n + 1) (the last layer 1), divided by the batch size, times 3 / 1000; summed."""
    n, bsz = len(gs), gs[0].shape[0]
    total = 0.0
    for i, (s, t) in enumerate(zip(gs, gt)):
        on, off = (t > 0).to(s.dtype), (t <= 0).to(s.dtype)
        layer = ((s + margin).pow(2) * ((s > -margin).to(s.dtype) * off)
                 + (s - margin).pow(2) * ((s <= margin).to(s.dtype) * on)).sum()
        total = total + 2.0 ** (i - n + 1) * layer / bsz * 3 / 1000
    return total


@fp32
def factor(f: Tensor, p1: float = 2.0) -> Tensor:
    """Kim et al. 2018 (FT): a map's factor as RepDistiller computes it, the L2-normalised channel mean of f^p1."""
    return F.normalize(f.pow(p1).mean(1).flatten(1), dim=1)


@fp32
def ft(factor_s: Tensor, factor_t: Tensor, p1: float = 2.0, p2: int = 1) -> Tensor:
    """Kim et al. 2018 (FT), RepDistiller's FactorTransfer: the larger of the two factor maps (translator
    output, paraphraser code) pooled to the smaller's size, then mean |F(s) - F(t)|^p2 of their factors."""
    factor_s, factor_t = match_spatial(factor_s, factor_t)
    diff = factor(factor_s, p1) - factor(factor_t, p1)
    return diff.abs().mean() if p2 == 1 else diff.pow(p2).mean()


@fp32
def standardize(z: Tensor) -> Tensor:
    """Sun et al. 2024, logit standardisation: (z - mean) / (1e-7 + std) per row, std as `torch.std`
    (unbiased), the epsilon added to it (sunshangquan/logit-standardization-KD's `normalize`)."""
    return (z - z.mean(-1, keepdim=True)) / (1e-7 + z.std(-1, keepdim=True))


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of `a` with the same row of `b` (DIST's cosine of centred rows)."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@fp32
def dist(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, gamma: float = 1.0,
         tau: float = 1.0) -> Tensor:
    """Huang et al. 2022 (DIST): with p = softmax(z / tau), beta * tau^2 * (1 - mean Pearson correlation of
    each sample's class probabilities, student vs teacher: inter-class) + gamma * tau^2 * (1 - mean Pearson
    correlation of each class's probabilities over the batch: intra-class), as hunto/DIST_KD's dist_kd.py."""
    ps, pt = F.softmax(student_logits / tau, 1), F.softmax(teacher_logits / tau, 1)
    inter = 1 - _pearson_rows(ps, pt).mean()
    intra = 1 - _pearson_rows(ps.t(), pt.t()).mean()
    return tau ** 2 * (beta * inter + gamma * intra)


def _finite(x: Tensor) -> Tensor:
    """Non-finite entries set to 0 (mdistiller's `removenan`)."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _right_singular(f: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """mdistiller's KDSVD `svd`: a (B, C, H, W) map as B matrices of (C*H, W); the first `n` singular values
    (B, n) and right singular vectors (B, W, n), each L2-normalised over dim 1, non-finite entries zeroed."""
    b, c, h, w = f.shape
    _, s, vh = torch.linalg.svd(f.reshape(b, c * h, w), full_matrices=False)
    s, v = _finite(s), _finite(vh.mT)
    return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


@fp32
def kdsvd(s_feats: list[Tensor], t_feats: list[Tensor], k: int = 1) -> Tensor:
    """Lee et al. 2018 (KD-SVD), as mdistiller's `kdsvd_loss`: per tap, the teacher's first k right singular
    vectors and the student's first k + 3, each teacher vector matched by the student vector of largest
    |cosine| (sign-aligned), both scaled by the teacher's normalised singular values; between consecutive
    taps, the RBF kernel exp(-(v_i - v_(i-1))^2 / 8) over all position pairs; sum of squared student-teacher
    kernel differences (non-finite ones zeroed), divided by the batch size, summed over tap pairs."""
    total, prev = 0.0, None
    for fs, ft in zip(s_feats, t_feats):
        s_t, v_t = _right_singular(ft, k)
        _, v_s = _right_singular(fs, k + 3)
        cos = v_s.mT @ v_t  # (B, k + 3, k)
        best = cos.abs().amax(1, keepdim=True)
        v_s = v_s @ torch.where(best == cos.abs(), cos.sign(), torch.zeros_like(cos))
        v_s, v_t = v_s * s_t[:, None], v_t * s_t[:, None]
        if prev is not None:
            rbf = lambda v, vb: torch.exp(-(v[:, :, None] - vb[:, None]).pow(2) / 8)  # noqa: E731
            total = total + _finite((rbf(v_s, prev[0]) - rbf(v_t, prev[1]).detach()).pow(2)).sum() / fs.shape[0]
        prev = v_s, v_t
    return total


@fp32
def hcl(fs_list: list[Tensor], ft_list: list[Tensor]) -> Tensor:
    """Chen et al. 2021 (ReviewKD), the hierarchical context loss as mdistiller's `hcl_loss`: per level, the MSE of
    the full maps (weight 1) plus the MSEs of both maps average-pooled to 4x4, 2x2 and 1x1 where that is smaller than
    the map's height (weights 1/2, 1/4, ... over the levels used), divided by the sum of the weights; summed."""
    total = 0.0
    for fs, ft in zip(fs_list, ft_list):
        h = fs.shape[2]
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for size in (4, 2, 1):
            if size < h:
                weight /= 2
                loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size))
                weights += weight
        total = total + loss / weights
    return total


def ofd_margin(gamma: Tensor, beta: Tensor) -> Tensor:
    """Heo et al. 2019 (OFD): per channel, E[x | x < 0] for x ~ N(beta, gamma^2), the teacher's BN before its ReLU;
    -3 |gamma| where P(x < 0) <= 0.001 (mdistiller's `init_ofd_modules`, computed in float64)."""
    s, m = gamma.double().abs(), beta.double()
    cdf = 0.5 * (1 + torch.erf(-m / s / math.sqrt(2)))
    margin = -s * torch.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / cdf + m
    return torch.where(cdf > 0.001, margin, -3 * s).float()


@fp32
def ofd(s_feats: list[Tensor], t_feats: list[Tensor], margins: list[Tensor]) -> Tensor:
    """Heo et al. 2019 (OFD), mdistiller's `feat_loss` summed over levels: the connected student pre-ReLU map s and
    the teacher's t (average-pooled to s's size), squared error where t > 0, or where s > t > margin and t <= 0,
    and (s - margin)^2 where s > margin >= t; summed over C, H, W, mean over the batch; level i of n weighted
    1 / 2^(n - 1 - i) (the last 1)."""
    n, total = len(s_feats), 0.0
    for i, (s, t, m) in enumerate(zip(s_feats, t_feats, margins)):
        t = F.adaptive_avg_pool2d(t, s.shape[-2:])
        m = m.view(1, -1, 1, 1)
        loss = ((s - m) ** 2 * ((s > m) & (t <= m)) + (s - t) ** 2 * ((s > t) & (t > m) & (t <= 0))
                + (s - t) ** 2 * (t > 0))
        total = total + loss.abs().mean(0).sum() / 2 ** (n - 1 - i)
    return total


def _class_correlation(ps: Tensor, pt: Tensor) -> Tensor:
    """MLKD's cc_loss: the C x C Gram matrices p^T p of the batch's probabilities; sum of squared differences / C."""
    return (pt.t() @ pt - ps.t() @ ps).pow(2).sum() / ps.shape[1]


def _batch_correlation(ps: Tensor, pt: Tensor) -> Tensor:
    """MLKD's bc_loss: the B x B Gram matrices p p^T; sum of squared differences / B."""
    return (pt @ pt.t() - ps @ ps.t()).pow(2).sum() / ps.shape[0]


def _below_median(v: Tensor) -> Tensor:
    """The fraction of `v` at or below its median (np.percentile(v, 50), linear interpolation): MLKD's confidence
    masks, which multiply losses already averaged to scalars, so they weigh them by this fraction (about 1/2)."""
    return (v <= torch.quantile(v, 0.5)).to(v.dtype).mean()


@fp32
def mlkd(s_weak: Tensor, t_weak: Tensor, s_strong: Tensor, t_strong: Tensor, temperature: float = 4.0,
         logit_std: bool = False) -> Tensor:
    """Jin et al. 2023 (MLKD), the distillation terms as its code (`KD_ours.py`) computes them, unweighted: over the
    temperatures (T, 3, 5, 2, 6), instance-level KD on the weak view times the fraction of samples whose teacher
    confidence (max softmax, weak view) is at or below the batch median, plus KD on the strong view at T, 3 and 5
    and on the weak view at 2 and 6 (as the code has it), plus class-correlation (weighed by the fraction of classes
    at or below the median summed confidence) and batch-correlation (by the samples' fraction) on the weak view.
    `logit_std` standardises the logits of the KD terms only (logit-standardization-KD's MLKD)."""
    temps = (temperature, 3.0, 5.0, 2.0, 6.0)
    p_t = F.softmax(t_weak, 1)
    samples, classes = _below_median(p_t.max(1).values), _below_median(p_t.sum(0))
    z = standardize if logit_std else (lambda v: v)
    zs_w, zt_w, zs_s, zt_s = z(s_weak), z(t_weak), z(s_strong), z(t_strong)
    kd_weak = sum(kd(zs_w, zt_w, t) for t in temps) * samples
    kd_strong = (kd(zs_s, zt_s, temperature) + kd(zs_s, zt_s, 3.0) + kd(zs_s, zt_s, 5.0) + kd(zs_w, zt_w, 2.0)
                 + kd(zs_w, zt_w, 6.0))
    probs = [(F.softmax(s_weak / t, 1), F.softmax(t_weak / t, 1)) for t in temps]
    cc = sum(_class_correlation(ps, pt) for ps, pt in probs) * classes
    bc = sum(_batch_correlation(ps, pt) for ps, pt in probs) * samples
    return kd_weak + kd_strong + cc + bc
