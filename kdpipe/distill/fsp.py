"""FSP: Yim et al. 2017, flow-of-solution-procedure matrices of consecutive taps (f0,f1), (f1,f2), (f2,f3)."""

from . import functional as Fd
from .base import Term, check_paired_stages, register


def check_channels(s_shapes, t_shapes) -> None:
    """FSP compares G matrices elementwise, so each tap needs equal teacher and student channels."""
    check_paired_stages("fsp", s_shapes, t_shapes)
    bad = [f"f{i}: student {s[0]} vs teacher {t[0]}"
           for i, (s, t) in enumerate(zip(s_shapes.stages, t_shapes.stages)) if s[0] != t[0]]
    if bad:
        raise ValueError(f"fsp needs equal channel counts per tap (RepDistiller: N/A for such pairs); {'; '.join(bad)}")


@register("fsp")
class FSP(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        check_channels(s_shapes, t_shapes)

    def forward(self, b):
        return Fd.fsp(b.s_feats, b.t_feats)
