"""DKD: Zhao et al. 2022, decoupled KD (mdistiller): tckd * TCKD + beta * NCKD, times T^2, scaled by a
linear warm-up min(epoch / warmup_epochs, 1) with epochs counted from 1, as mdistiller does; with
`logit_std`, on standardised logits (Sun et al. 2024)."""

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..config.distill import FeatureParams, epoch_count, logit_std_field
from ..losses import fp32
from .base import Term, logits, register, warmup


# the loss, a pure function (tensors in, a scalar out)
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


class DKDParams(FeatureParams):
    beta: float = Field(8.0, ge=0, description="weight of NCKD (mdistiller's BETA; per pair in its configs)")
    tckd: float = Field(1.0, ge=0, description="weight of TCKD (mdistiller's ALPHA)")
    warmup_epochs: int = epoch_count(20, ge=0, description="DKD's weight ramps up linearly over these epochs")
    logit_std: bool = logit_std_field()


@register("dkd", DKDParams)
class DecoupledKD(Term):
    weight_param = None  # alpha (tckd) and beta weigh the two parts inside the loss

    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        self.cfg = cfg

    def forward(self, b):
        c = self.cfg
        s, t = logits(b, c)
        return warmup(b.epoch, c.warmup_epochs) * dkd(s, t, b.y, c.tckd, c.beta, c.temperature)
