"""The distillation losses as pure functions (public API). Each returns a scalar tensor.

Features are the taps `[f0, f1, f2, f3]` of `model(x, features=True)`. Conventions follow the papers
as implemented in the CIFAR distillation literature (RepDistiller), so results compare with its tables.

Every loss is decorated with `@fp32` (kdpipe/losses.py): it computes in fp32 whatever autocast region
it is called from.
"""

from __future__ import annotations

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
