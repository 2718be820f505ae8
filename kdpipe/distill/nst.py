"""NST: Huang & Wang 2017, MMD with a polynomial kernel, summed over the stage outputs (every tap but the
stem's, as RepDistiller's `feat[1:-1]`)."""

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ..config.distill import FeatureParams
from ..losses import fp32
from .base import Term, check_paired_stages, register
from .functional import match_spatial


# the loss and its helpers, pure functions (tensors in, tensors out)
def _poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over batch and all channel pairs (i, j) of k(a_i, b_j) = (a_i . b_j)^2."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


@fp32
def nst(fs: Tensor, ft: Tensor) -> Tensor:
    """Huang & Wang 2017, neural selectivity transfer: squared MMD with the polynomial kernel
    k(x, y) = (x^T y)^2 between the L2-normalised channel rows (over H*W) of each sample."""
    fs, ft = match_spatial(fs, ft)
    s = F.normalize(fs.flatten(2), dim=2)
    t = F.normalize(ft.flatten(2), dim=2)
    return _poly_kernel_mean(t, t) + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(s, t)


class NSTParams(FeatureParams):
    beta: float = Field(50.0, ge=0)


@register("nst", NSTParams)
class NeuralSelectivityTransfer(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        check_paired_stages("nst", s_shapes, t_shapes)

    def forward(self, b):
        return sum(nst(fs, ft) for fs, ft in zip(b.s_feats[1:], b.t_feats[1:]))
