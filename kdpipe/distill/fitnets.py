"""FitNets: Romero et al. 2015, the student's hint layer regressed onto the teacher's (MSE)."""

from . import functional as Fd
from .base import Term, register, regressor


@register("fitnets")
class FitNets(Term):
    label = "FitNets"

    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        self.layer = cfg.hint_layer
        if self.layer >= min(len(s_shapes.stages), len(t_shapes.stages)):
            raise ValueError(f"fitnets hint_layer {self.layer} is past the last feature tap "
                             f"(student {len(s_shapes.stages)}, teacher {len(t_shapes.stages)} taps)")
        self.regressor = regressor(s_shapes.stages[self.layer], t_shapes.stages[self.layer], cfg.regressor_kernel)

    def forward(self, b):
        return Fd.hint(self.regressor(b.s_feats[self.layer]), b.t_feats[self.layer])
