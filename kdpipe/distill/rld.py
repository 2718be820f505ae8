"""RLD: Sun et al., "Knowledge Distillation with Refined Logits" (refined logit distillation), as its authors' code
computes it (zju-SWJ/RLD, `mdistiller/distillers/RLD.py`): two KL terms on logits the label refines, so that a
teacher that ranks a wrong class first never pulls the student away from the label:
- SCD (sample confidence): binary distributions, the student's probability of the label vs the rest against the
  teacher's probability of its own top class vs the rest (its confidence, whatever class it picks), at
  `scd_temperature`, weight `scd`;
- MCD (masked correlation): the distributions over the classes the teacher ranks strictly below the label, the
  label and every class ranked at or above it masked out of both softmaxes, at `temperature`, weight `beta`.
Each KL times its temperature squared; the sum ramps up linearly over `warmup_epochs` (mdistiller's min(epoch /
warmup, 1), epochs counted from 1). With `logit_std`, on standardised logits (the authors' `--logit-stand`)."""

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import fp32
from .base import Term, logits, register, warmup


def _binary(p: Tensor, picked: Tensor) -> Tensor:
    """(p of the picked class, the sum of the others) per row."""
    one = F.one_hot(picked, p.shape[1]).bool()
    return torch.stack([p[one], p.masked_fill(one, 0).sum(1)], 1)


# the loss, a pure function (tensors in, a scalar out)
@fp32
def rld(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, scd: float = 1.0, beta: float = 8.0,
        temperature: float = 4.0, scd_temperature: float = 4.0) -> Tensor:
    """RLD, batch means: scd * SCD * T_scd^2 + beta * MCD * T^2. SCD: KL between the teacher's (p of its argmax,
    the rest) and the student's (p of the label, the rest), softmax at T_scd. MCD: KL between the softmaxes at T
    of the classes whose teacher logit is below the label's (the others filled with -1e9 in both, as the code)."""
    ts = scd_temperature
    bs = _binary(F.softmax(student_logits / ts, 1), target)
    bt = _binary(F.softmax(teacher_logits / ts, 1), teacher_logits.argmax(1))
    scd_loss = F.kl_div(bs.log(), bt, reduction="batchmean") * ts * ts
    kept_out = teacher_logits >= teacher_logits.gather(1, target[:, None])  # the label and the classes above it
    log_qs = F.log_softmax((student_logits / temperature).masked_fill(kept_out, -1e9), 1)
    qt = F.softmax((teacher_logits / temperature).masked_fill(kept_out, -1e9), 1)
    mcd_loss = F.kl_div(log_qs, qt, reduction="batchmean") * temperature * temperature
    return scd * scd_loss + beta * mcd_loss


@register("rld")
class RLD(Term):
    weight_param = None  # scd and beta weigh the two parts inside the loss

    def __init__(self, cfg, s_shapes=None, t_shapes=None, data=None):
        super().__init__()
        self.cfg = cfg

    def forward(self, b):
        c = self.cfg
        s, t = logits(b, c)
        ts = c.temperature if c.scd_temperature is None else c.scd_temperature
        return warmup(b.epoch, c.warmup_epochs) * rld(s, t, b.y, c.scd, c.beta, c.temperature, ts)
