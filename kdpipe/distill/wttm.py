"""WTTM: Zheng & Yang 2024, "Knowledge Distillation Based on Transformed Teacher Matching" (ICLR 2024), as its
authors' code computes it (zkxufo/TTM, `distiller_zoo/wttm.py` and `ttm.py`): the student's plain softmax (no
temperature) matches the teacher's distribution transformed by the power `exponent` (gamma = 1/T in the paper)
and renormalised; WTTM weighs each sample's KL divergence by that power transform's sum before normalisation
(sum_i p_t,i^gamma, larger for a smoother teacher). `weighted: false` is TTM, the unweighted mean. Weight `beta`
(the authors' `-b`, or `-a` as the additional loss)."""

import torch.nn.functional as F
from torch import Tensor

from ..losses import fp32
from .base import Term, logits, register


# the loss, a pure function (tensors in, a scalar out)
@fp32
def wttm(student_logits: Tensor, teacher_logits: Tensor, exponent: float = 0.2, weighted: bool = True) -> Tensor:
    """Zheng & Yang 2024: with p_t^gamma = softmax(t)^gamma, q = p_t^gamma / sum(p_t^gamma) and p_s = softmax(s),
    the batch mean of sum(p_t^gamma) * KL(q || p_s) (WTTM), or of KL(q || p_s) alone (TTM, `weighted=False`)."""
    powered = F.softmax(teacher_logits, 1).pow(exponent)
    norm = powered.sum(1)
    q = powered / norm[:, None]
    kl = F.kl_div(F.log_softmax(student_logits, 1), q, reduction="none").sum(1)
    return (norm * kl).mean() if weighted else kl.mean()


@register("wttm")
class WTTM(Term):
    def __init__(self, cfg, s_shapes=None, t_shapes=None, data=None):
        super().__init__()
        self.cfg = cfg

    def forward(self, b):
        s, t = logits(b, self.cfg)
        return wttm(s, t, self.cfg.exponent, self.cfg.weighted)
