"""WTTM: Zheng & Yang 2024, "Knowledge Distillation Based on Transformed Teacher Matching" (ICLR 2024), as its
authors' code computes it (zkxufo/TTM, `distiller_zoo/wttm.py` and `ttm.py`): the student's plain softmax (no
temperature) matches the teacher's distribution transformed by the power `exponent` (gamma = 1/T in the paper)
and renormalised; WTTM weighs each sample's KL divergence by that power transform's sum before normalisation
(sum_i p_t,i^gamma, larger for a smoother teacher). `weighted: false` is TTM, the unweighted mean. Weight `beta`
(the authors' `-b`, or `-a` as the additional loss)."""

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..config.distill import FeatureParams
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


class WTTMParams(FeatureParams):
    """zkxufo/TTM. Its code sets no WTTM default beyond the power (train_student.py:68 `--ttm_l` 1, i.e. KD at T 1)
    and CE's weight (train_student.py:60 `-r` 1); the loss weights come per run, and the paper lists them per pair
    in its appendix A.4. Here: the README's WTTM command (README.md:37-42: `--add wttm --ttm_l 0.2 -a 4`, WTTM at
    weight 4 beside CRD) for WTTM; its TTM command (README.md:18-23: `--distill ttm --ttm_l 0.1 -r 1 -b 45 -a 0`,
    vgg13 -> vgg8) is `weighted: false, exponent: 0.1, beta: 45`."""

    beta: float = Field(4.0, ge=0, description="weight of the (W)TTM term (README.md:40-41: -a 4 for --add wttm)")
    exponent: float = Field(0.2, gt=0, description="the power transform of the teacher's probabilities, gamma = 1/T "
                                                   "(--ttm_l; README.md:40: 0.2 for WTTM, README.md:21: 0.1 for TTM)")
    weighted: bool = Field(True, description="WTTM (distiller_zoo/wttm.py:19, each sample's KL times sum p_t^gamma); "
                                             "false: TTM (distiller_zoo/ttm.py:19, the plain mean)")


@register("wttm", WTTMParams)
class WTTM(Term):
    def __init__(self, cfg, s_shapes=None, t_shapes=None, data=None):
        super().__init__()
        self.cfg = cfg

    def forward(self, b):
        s, t = logits(b, self.cfg)
        return wttm(s, t, self.cfg.exponent, self.cfg.weighted)
