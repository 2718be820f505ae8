"""FitNets: Romero et al. 2015, the student's hint layer regressed onto the teacher's (MSE)."""

from torch import nn

from . import functional as Fd
from . import register


def regressor(s_shape, t_shape, kernel: int = 3) -> nn.Sequential:
    """conv + BN + ReLU from the student's hint (C_s, H_s, W_s) to the teacher's (C_t, H_t, W_t).
    Equal sizes: a `kernel` x `kernel` conv (stride 1); a student map twice as large: 3x3 stride 2."""
    (cs, hs, ws), (ct, ht, wt) = s_shape, t_shape
    if (hs, ws) == (ht, wt):
        conv = nn.Conv2d(cs, ct, kernel, 1, kernel // 2, bias=False)
    elif (hs, ws) == (2 * ht, 2 * wt):
        conv = nn.Conv2d(cs, ct, 3, 2, 1, bias=False)
    else:
        raise ValueError(f"fitnets: no regressor from a {hs}x{ws} student hint to a {ht}x{wt} teacher hint")
    return nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU(inplace=True))


@register("fitnets")
class FitNets(nn.Module):
    def __init__(self, cfg, s_shapes, t_shapes):
        super().__init__()
        self.layer = cfg.hint_layer
        self.regressor = regressor(s_shapes[self.layer], t_shapes[self.layer], cfg.regressor_kernel)

    def forward(self, s_logits, s_feats, t_logits, t_feats):
        return Fd.hint(self.regressor(s_feats[self.layer]), t_feats[self.layer])
