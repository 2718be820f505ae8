"""DIST: Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher": match the teacher's relations
(Pearson correlation) between classes in each sample and between samples in each class, not its exact
probabilities (hunto/DIST_KD). Weight `beta` (the authors' kd_loss_weight 2), tau = `temperature`."""

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..config.distill import FeatureParams, logit_std_field
from ..losses import fp32
from .base import Term, logits, register


# the loss and its helpers, pure functions (tensors in, tensors out)
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


class DISTParams(FeatureParams):
    beta: float = Field(2.0, ge=0, description="weight of the DIST term (the authors' kd_loss_weight)")
    temperature: float = Field(4.0, gt=0, description="DIST's tau (CIFAR 4, ImageNet 1)")
    inter: float = Field(1.0, ge=0, description="DIST's beta: weight of the inter-class relation")
    intra: float = Field(1.0, ge=0, description="DIST's gamma: weight of the intra-class relation")
    logit_std: bool = logit_std_field()


@register("dist", DISTParams)
class DIST(Term):
    def __init__(self, cfg, s_shapes=None, t_shapes=None, data=None):
        super().__init__()
        self.cfg = cfg

    def forward(self, b):
        s, t = logits(b, self.cfg)
        return dist(s, t, self.cfg.inter, self.cfg.intra, self.cfg.temperature)
