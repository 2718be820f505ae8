"""MLKD: Jin et al. 2023, "Multi-Level Logit Distillation", as its authors' code runs it (Jin-Ying/Multi-Level-
Logit-Distillation, `KD_ours.py` and its `AugTrainer`): each batch has a second, strongly augmented view (the data
source adds it, kdpipe/augment.py); the student and the teacher see both; CE on both views (weight gamma
each); instance-, class- and batch-level alignment over five temperatures (`mlkd` below), weight beta (its
KD_WEIGHT). With `logit_std`, its KD terms on standardised logits (Sun et al. 2024's MLKD+LS)."""

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..config.distill import FeatureParams, logit_std_field
from ..losses import fp32
from .base import Term, register
from .functional import cross_entropy, kd, standardize


# the loss and its helpers, pure functions (tensors in, tensors out)
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


class MLKDParams(FeatureParams):
    gamma: float = Field(0.1, ge=0, description="weight of CE on each of the two views (MLKD's CE_WEIGHT)")
    temperature: float = Field(4.0, gt=0, description="the first of MLKD's temperatures (T, 3, 5, 2, 6)")
    beta: float = Field(0.9, ge=0, description="weight of every alignment term (MLKD's KD_WEIGHT)")
    logit_std: bool = logit_std_field()


@register("mlkd", MLKDParams)
class MLKD(Term):
    label = "MLKD"
    views = ("strong",)
    supports_ddp = False  # the student runs two forward passes per step; DDP expects one
    weight_param = None  # gamma and beta weigh the parts inside

    def __init__(self, cfg, s_shapes=None, t_shapes=None, data=None):
        super().__init__()
        self.cfg = cfg

    def forward(self, b):
        s_strong, t_strong = b.views["strong"]
        c = self.cfg
        return (c.gamma * cross_entropy(s_strong, b.y)
                + c.beta * mlkd(b.s_logits, b.t_logits, s_strong, t_strong, c.temperature, c.logit_std))
