"""KD-SVD: Lee et al. 2018, "Self-supervised Knowledge Distillation Using Singular Value Decomposition", as
mdistiller's KDSVD runs it: the stage outputs after the stem (f1, f2, f3 on the CIFAR ResNets), compressed by
SVD to their leading right singular vectors, whose RBF relations between consecutive stages the student
matches. No trainable parts. Needs the paired taps to have equal widths (mdistiller's (C*H, W) matrices)."""

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..config.distill import FeatureParams
from ..losses import fp32
from .base import Term, register


# the loss and its helpers, pure functions (tensors in, tensors out)
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


def _leading_right_vectors(f: Tensor, n: int) -> Tensor:
    """The first `n` right singular vectors of `f`'s (C*H, W) matrices (B, W, n), L2-normalised over dim 1,
    non-finite entries zeroed, as the leading eigenvectors of their W x W Gram matrices: `_right_singular`'s up to
    each vector's sign, from one batched eigensolver on small matrices instead of B SVDs of tall ones (and their
    backward). Only where the sign does not count: the student's vectors, which `kdsvd` aligns to the teacher's."""
    b, c, h, w = f.shape
    a = f.reshape(b, c * h, w)
    _, vectors = torch.linalg.eigh(a.mT @ a)  # eigenvalues ascending: the leading vectors last
    return F.normalize(_finite(vectors[..., -n:].flip(-1)), dim=1)


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
        v_s = _leading_right_vectors(fs, k + 3)  # its sign aligned below: the SVD's would be the same
        cos = v_s.mT @ v_t  # (B, k + 3, k)
        best = cos.abs().amax(1, keepdim=True)
        v_s = v_s @ torch.where(best == cos.abs(), cos.sign(), torch.zeros_like(cos))
        v_s, v_t = v_s * s_t[:, None], v_t * s_t[:, None]
        if prev is not None:
            rbf = lambda v, vb: torch.exp(-(v[:, :, None] - vb[:, None]).pow(2) / 8)  # noqa: E731
            total = total + _finite((rbf(v_s, prev[0]) - rbf(v_t, prev[1]).detach()).pow(2)).sum() / fs.shape[0]
        prev = v_s, v_t
    return total


class KDSVDParams(FeatureParams):
    beta: float = Field(1.0, ge=0)
    k: int = Field(1, ge=1, description="the teacher's singular vectors kept (the student's: k + 3)")


@register("kdsvd", KDSVDParams)
class KDSVD(Term):
    label = "KD-SVD"

    def __init__(self, cfg, s_shapes, t_shapes, data=None):
        super().__init__()
        self.k = cfg.k
        widths = [(s[2], t[2]) for s, t in zip(s_shapes.stages[1:], t_shapes.stages[1:])]
        if len(widths) < 2:
            raise ValueError("kdsvd relates consecutive stage taps after the stem: both models need two or more")
        if any(ws != wt for ws, wt in widths):
            raise ValueError(f"kdsvd needs equal widths of the paired feature maps; student vs teacher: {widths}")

    def forward(self, b):
        return kdsvd(b.s_feats[1:], b.t_feats[1:], self.k)
