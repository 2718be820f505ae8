"""CC: Peng et al. 2019, correlation congruence of linearly embedded vectors (RepDistiller's LinearEmbed,
feat_dim 128, one for the student and one for the teacher; both trained with the student)."""

from torch import nn

from . import functional as Fd
from .base import Term, register


@register("cc")
class CorrelationCongruence(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        self.embed_s = nn.Linear(s_shapes.embedding, cfg.feat_dim)
        self.embed_t = nn.Linear(t_shapes.embedding, cfg.feat_dim)

    def forward(self, b):
        return Fd.cc(self.embed_s(b.s_embedding), self.embed_t(b.t_embedding))
