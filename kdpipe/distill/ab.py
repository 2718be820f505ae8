"""AB: Heo et al. 2019, activation boundaries (RepDistiller's `abound`): the student's pre-ReLU stage taps
(every tap but the stem's, through a connector where the shapes differ: RepDistiller's `Connector`, identity
for equal channels and size, else `ConvReg` without ReLU) learn the teacher's activation pattern with the
alternative L2 loss (margin 1). RepDistiller trains this in a 30-epoch init stage (connectors and the
student's feature layers), then the student with CE alone; the connectors are not used after it."""

from pydantic import Field
from torch import Tensor, nn

from ..config.distill import FeatureParams, epoch_count
from ..losses import fp32
from .base import Term, check_paired_stages, register, regressor


# the loss, a pure function (tensors in, a scalar out)
@fp32
def ab(gs: list[Tensor], gt: list[Tensor], margin: float = 1.0) -> Tensor:
    """Heo et al. 2019 (AB), as RepDistiller's ABLoss: per layer, the alternative L2 loss on the (connected)
    student pre-activation s and the teacher's t, sum over elements of
    (s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0];
    layer i of n weighted 2^(i - n + 1) (the last layer 1), divided by the batch size, times 3 / 1000; summed."""
    n, bsz = len(gs), gs[0].shape[0]
    total = 0.0
    for i, (s, t) in enumerate(zip(gs, gt)):
        on, off = (t > 0).to(s.dtype), (t <= 0).to(s.dtype)
        layer = ((s + margin).pow(2) * ((s > -margin).to(s.dtype) * off)
                 + (s - margin).pow(2) * ((s <= margin).to(s.dtype) * on)).sum()
        total = total + 2.0 ** (i - n + 1) * layer / bsz * 3 / 1000
    return total


class ABParams(FeatureParams):
    beta: float = Field(1.0, ge=0, description="weight of the AB term in single-stage mode (init_epochs: 0)")
    margin: float = Field(1.0, gt=0, description="the activation-boundary margin")
    init_epochs: int = epoch_count(30, ge=0, description="RepDistiller: 30 epochs of AB pre-training (connectors and "
                                                   "the student's features), then CE alone; 0: single-stage variant")


@register("ab", ABParams)
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
        return ab(gs, b.t_preact[1:], self.margin)
