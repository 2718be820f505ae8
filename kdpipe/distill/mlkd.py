"""MLKD: Jin et al. 2023, "Multi-Level Logit Distillation", as its authors' code runs it (Jin-Ying/Multi-Level-
Logit-Distillation, `KD_ours.py` and its `AugTrainer`): each batch has a second, strongly augmented view (the data
source adds it, kdpipe/randaugment.py); the student and the teacher see both; CE on both views (weight gamma
each); instance-, class- and batch-level alignment over five temperatures (`functional.mlkd`), weight beta (its
KD_WEIGHT). With `logit_std`, its KD terms on standardised logits (Sun et al. 2024's MLKD+LS)."""

from . import functional as Fd
from .base import Term, register


@register("mlkd")
class MLKD(Term):
    label = "MLKD"
    views = ("strong",)
    supports_ddp = False  # the student runs two forward passes per step; DDP expects one
    weight = 1.0  # gamma and beta weigh the parts inside

    def __init__(self, cfg, s_shapes=None, t_shapes=None, data=None):
        super().__init__()
        self.cfg = cfg

    def forward(self, b):
        s_strong, t_strong = b.views["strong"]
        c = self.cfg
        return (c.gamma * Fd.cross_entropy(s_strong, b.y)
                + c.beta * Fd.mlkd(b.s_logits, b.t_logits, s_strong, t_strong, c.temperature, c.logit_std))
