"""CTKD: Li et al. 2023, "Curriculum Temperature for Knowledge Distillation" (zhengli97/CTKD, its global
temperature): KD at a learnable temperature tau = t_start + t_end * sigmoid(T), where T is one parameter trained
with the student (same SGD, lr and weight decay, as there) through a gradient-reversal layer, so the student
minimises the KD loss while T maximises it, ever harder: the reversal's factor lambda follows a cosine from
decay_max (0) to decay_min (-1) over the first decay_loops epochs, then stays. Weight `beta` (CTKD's -a 0.9)."""

import math

import torch
from pydantic import Field
from torch import nn

from ..config.distill import FeatureParams, epoch_count, logit_std_field
from . import functional as Fd
from .base import Term, logits, register


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `lam` (CTKD's lambda is negative: a reversal)."""

    @staticmethod
    def forward(ctx, x, lam: float):
        ctx.lam = lam
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return ctx.lam * grad, None


def cosine_lambda(epoch: int, max_value: float, min_value: float, loops: int) -> float:
    """CTKD's CosineDecay.get_value at `epoch` (counted from 1, as its training loop calls it)."""
    i = min(max(epoch, 0), loops)
    return (math.cos(i * math.pi / loops) + 1.0) * 0.5 * (max_value - min_value) + min_value if loops else min_value


class CTKDParams(FeatureParams):
    gamma: float = Field(0.1, ge=0)
    beta: float = Field(0.9, ge=0, description="weight of KD at the curriculum temperature (CTKD's -a 0.9)")
    t_start: float = Field(1.0, gt=0, description="tau = t_start + t_end * sigmoid(T)")
    t_end: float = Field(20.0, gt=0)
    decay_max: float = Field(0.0, description="the gradient reversal's lambda: cosine from decay_max ...")
    decay_min: float = Field(-1.0, description="... to decay_min over the first decay_loops epochs, then flat")
    decay_loops: int = epoch_count(10, ge=0)
    logit_std: bool = logit_std_field()


@register("ctkd", CTKDParams)
class CTKD(Term):
    def __init__(self, cfg, s_shapes=None, t_shapes=None, data=None):
        super().__init__()
        self.cfg = cfg
        self.global_t = nn.Parameter(torch.ones(1))  # Global_T's parameter: tau starts at 1 + 20 sigmoid(1) = 15.6

    def temperature(self, epoch: int) -> torch.Tensor:
        """tau for the main phase's `epoch` (from 0), its gradient reversed with that epoch's lambda."""
        c = self.cfg
        lam = cosine_lambda(epoch + 1, c.decay_max, c.decay_min, c.decay_loops)
        return c.t_start + c.t_end * torch.sigmoid(GradientReversal.apply(self.global_t, lam))

    def forward(self, b):
        s, t = logits(b, self.cfg)
        return Fd.kd(s, t, self.temperature(b.epoch)[0])
