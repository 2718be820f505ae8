"""DIST: Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher": match the teacher's relations
(Pearson correlation) between classes in each sample and between samples in each class, not its exact
probabilities (hunto/DIST_KD). Weight `beta` (the authors' kd_loss_weight 2), tau = `temperature`."""

from . import functional as Fd
from .base import Term, logits, register


@register("dist")
class DIST(Term):
    def __init__(self, cfg, s_shapes=None, t_shapes=None, data=None):
        super().__init__()
        self.cfg = cfg

    def forward(self, b):
        s, t = logits(b, self.cfg)
        return Fd.dist(s, t, self.cfg.inter, self.cfg.intra, self.cfg.temperature)
