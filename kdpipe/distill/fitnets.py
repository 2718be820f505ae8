"""FitNets: Romero et al. 2015, the student's hint layer regressed onto the teacher's (MSE)."""

from torch import nn

from . import functional as Fd
from . import Term, register


def regressor(s_shape, t_shape, kernel: int = 1, relu: bool = True) -> nn.Sequential:
    """RepDistiller's `ConvReg`: conv (with bias) + BN + ReLU from the student's hint (C_s, H_s, W_s) to
    the teacher's (C_t, H_t, W_t). A student map twice as large: 3x3 stride 2; half as large: 4x4
    transposed conv stride 2; otherwise (H_s >= H_t) a (1+H_s-H_t) x (1+W_s-W_t) conv, i.e. 1x1 for
    equal sizes. `kernel=3` is a kdpipe variant for equal sizes (3x3, padding 1). `relu=False`: conv + BN
    (`ConvReg(use_relu=False)`, AB's connectors)."""
    (cs, hs, ws), (ct, ht, wt) = s_shape, t_shape
    if hs == 2 * ht:
        conv = nn.Conv2d(cs, ct, 3, 2, 1)
    elif 2 * hs == ht:
        conv = nn.ConvTranspose2d(cs, ct, 4, 2, 1)
    elif (hs, ws) == (ht, wt):
        conv = nn.Conv2d(cs, ct, kernel, 1, kernel // 2)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
    else:
        raise ValueError(f"fitnets: no regressor from a {hs}x{ws} student hint to a {ht}x{wt} teacher hint")
    return nn.Sequential(conv, nn.BatchNorm2d(ct), *([nn.ReLU(inplace=True)] if relu else []))


@register("fitnets")
class FitNets(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        self.layer = cfg.hint_layer
        if self.layer >= min(len(s_shapes.stages), len(t_shapes.stages)):
            raise ValueError(f"fitnets hint_layer {self.layer} is past the last feature tap "
                             f"(student {len(s_shapes.stages)}, teacher {len(t_shapes.stages)} taps)")
        self.regressor = regressor(s_shapes.stages[self.layer], t_shapes.stages[self.layer], cfg.regressor_kernel)

    def forward(self, b):
        return Fd.hint(self.regressor(b.s_feats[self.layer]), b.t_feats[self.layer])
