"""FitNets: Romero et al. 2015, the student's hint layer regressed onto the teacher's (MSE)."""

from typing import Literal

from pydantic import Field

from ..config.distill import FeatureParams, epoch_count
from . import functional as Fd
from .base import Term, register, regressor


class FitNetsParams(FeatureParams):
    beta: float = Field(100.0, ge=0)
    hint_layer: int = Field(2, ge=0, le=4, description="stage tap index (f0..f3; f0..f4 for VGG, ResNet-50, "
                                                        "MobileNetV2) of the hint (and guided) layer")
    regressor_kernel: Literal[1, 3] = Field(1, description="1: RepDistiller's ConvReg (1x1 for equal sizes); 3: 3x3")
    init_epochs: int = epoch_count(0, ge=0, description="> 0: the paper's two-stage procedure (hint training first)")


@register("fitnets", FitNetsParams)
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
