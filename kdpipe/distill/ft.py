"""FT: Kim et al. 2018, factor transfer of the last stage (RepDistiller's `factor`, models/util.py).
Init stage: a paraphraser (3x3 conv encoder to `rate` x the teacher's channels, transposed-conv decoder,
LeakyReLU 0.1, no BN) learns to reconstruct the teacher's last-stage map (MSE); the student is not trained
then. Main phase: a translator (3x3 conv encoder with BN, student channels -> the same factor width) maps the
student's last stage; loss = mean |F(translator(s)) - F(paraphraser code of t)| with F the normalised channel
mean of the squared factor. The paraphraser is frozen after its stage, the translator trains with the student."""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config.distill import FeatureParams, epoch_count
from ..losses import fp32
from .base import Term, register
from .functional import hint, match_spatial


# the loss and its helpers, pure functions (tensors in, tensors out)
@fp32
def factor(f: Tensor, p1: float = 2.0) -> Tensor:
    """Kim et al. 2018 (FT): a map's factor as RepDistiller computes it, the L2-normalised channel mean of f^p1."""
    return F.normalize(f.pow(p1).mean(1).flatten(1), dim=1)


@fp32
def ft(factor_s: Tensor, factor_t: Tensor, p1: float = 2.0, p2: int = 1) -> Tensor:
    """Kim et al. 2018 (FT), RepDistiller's FactorTransfer: the larger of the two factor maps (translator
    output, paraphraser code) pooled to the smaller's size, then mean |F(s) - F(t)|^p2 of their factors."""
    factor_s, factor_t = match_spatial(factor_s, factor_t)
    diff = factor(factor_s, p1) - factor(factor_t, p1)
    return diff.abs().mean() if p2 == 1 else diff.pow(p2).mean()


def lrelu() -> nn.Module:
    return nn.LeakyReLU(0.1, inplace=True)


def encoder(c_in: int, c_out: int, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in ((c_in, c_in), (c_in, c_out), (c_out, c_out)):
        layers += [nn.Conv2d(a, b, 3, 1, 1)] + ([nn.BatchNorm2d(b)] if bn else []) + [lrelu()]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    def __init__(self, c_t: int, rate: float):
        super().__init__()
        c = int(c_t * rate)
        self.encoder = encoder(c_t, c, bn=False)
        self.decoder = nn.Sequential(nn.ConvTranspose2d(c, c, 3, 1, 1), lrelu(), nn.ConvTranspose2d(c, c_t, 3, 1, 1),
                                     lrelu(), nn.ConvTranspose2d(c_t, c_t, 3, 1, 1), lrelu())


class FTParams(FeatureParams):
    beta: float = Field(200.0, ge=0)
    rate: float = Field(0.5, gt=0, le=1, description="factor channels = rate x the teacher's last-stage channels")
    p1: float = Field(2.0, gt=0, description="factor: channel mean of |f|^p1")
    p2: Literal[1, 2] = Field(1, description="1: mean absolute factor difference (the paper's L1); 2: squared")
    init_epochs: int = epoch_count(30, ge=1, description="epochs training the paraphraser on the teacher "
                                                   "(RepDistiller: 30) before the student's main phase")


@register("ft", FTParams)
class FactorTransfer(Term):
    init_trains_student = False  # the init stage trains the paraphraser on the teacher alone
    loss_after_init = True

    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        c_s, c_t = s_shapes.stages[-1][0], t_shapes.stages[-1][0]
        self.paraphraser = Paraphraser(c_t, cfg.rate)
        self.translator = encoder(c_s, int(c_t * cfg.rate), bn=True)
        self.p1, self.p2 = cfg.p1, cfg.p2

    def trainable_parts(self, phase: str):
        return (self.paraphraser if phase == "init" else self.translator).parameters()

    def init_loss(self, b):
        return hint(self.paraphraser.decoder(self.paraphraser.encoder(b.t_feats[-1])), b.t_feats[-1])

    def forward(self, b):
        with torch.no_grad():  # frozen after the init stage
            factor_t = self.paraphraser.encoder(b.t_feats[-1])
        return ft(self.translator(b.s_feats[-1]), factor_t, self.p1, self.p2)
