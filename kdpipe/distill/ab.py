"""AB: Heo et al. 2019, activation boundaries (RepDistiller's `abound`): the student's pre-ReLU stage taps
(every tap but the stem's, through a connector where the shapes differ: RepDistiller's `Connector`, identity
for equal channels and size, else `ConvReg` without ReLU) learn the teacher's activation pattern with the
alternative L2 loss (margin 1). RepDistiller trains this in a 30-epoch init stage (connectors and the
student's feature layers), then the student with CE alone; the connectors are not used after it."""

from torch import nn

from .base import Term, check_paired_stages, register, regressor
from . import functional as Fd


@register("ab")
class ActivationBoundaries(Term):
    uses_preact = True

    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        check_paired_stages("ab", s_shapes, t_shapes)
        self.margin = cfg.margin
        self.single_stage = cfg.init_epochs == 0  # kdpipe variant: beta * AB in the main loss
        self.connectors = nn.ModuleList(
            nn.Identity() if (s[0], s[1]) == (t[0], t[1]) else regressor(s, t, relu=False)
            for s, t in zip(s_shapes.stages[1:], t_shapes.stages[1:]))

    def trainable_parts(self, phase: str):
        return self.connectors.parameters() if phase == "init" or self.single_stage else []

    def forward(self, b):
        gs = [c(f) for c, f in zip(self.connectors, b.s_preact[1:])]
        return Fd.ab(gs, b.t_preact[1:], self.margin)
