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

from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..config.distill import FeatureParams, epoch_count, logit_std_field
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


class RLDParams(FeatureParams):
    """zju-SWJ/RLD: its mdistiller/engine/cfg.py:180-185 (its configs/cifar100/rld/*.yaml set none of these) and the
    README's RLD command (README.md:22: `--same-t RLD.ALPHA 1. RLD.BETA 8. RLD.T 4.`). Its ImageNet configs
    (configs/imagenet/*/rld.yaml) use T 1, warm-up 1 and BETA 0.5 (ResNet-34 -> 18) or 2.0 (ResNet-50 -> MobileNetV1)."""

    beta: float = Field(8.0, ge=0, description="weight of MCD, the masked correlation KL (cfg.py:182 RLD.BETA)")
    scd: float = Field(1.0, ge=0, description="weight of SCD, the sample confidence KL (cfg.py:181 RLD.ALPHA)")
    temperature: float = Field(4.0, gt=0, description="MCD's temperature (cfg.py:184 RLD.T)")
    scd_temperature: Optional[float] = Field(None, gt=0, description="SCD's temperature (RLD.ALPHA_T); null: "
                                             "`temperature`, the README's `--same-t` (tools/train.py:191-192)")
    warmup_epochs: int = epoch_count(20, ge=0, description="the loss ramps up linearly over these epochs (cfg.py:185)")
    logit_std: bool = logit_std_field()


@register("rld", RLDParams)
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
