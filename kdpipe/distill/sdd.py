"""SDD: Wei et al. 2024, "Scale Decoupled Distillation" (CVPR 2024), as its authors' code computes it
(shicaiwei123/SDD-CVPR2024: `mdistiller/models/cifar/utils.py`'s SPP, the models' `patch_score`, and the losses
`sdd_kd_loss` in `mdistiller/distillers/KD.py` and `multi_dkd` in `SDD_DKD.py`): each model's final map (the one
its embedding averages) is average-pooled to 4x4, and from that to each scale of `levels` (the code's M: [1, 2, 4]
gives 1 + 4 + 16 regions, the global one first); each region's pooled vector goes through the model's own classifier
(the student's trains through it). The base loss (`base`: KD, or DKD with its TCKD/NCKD weights) is computed per
region and sample, times T^2; a region whose teacher prediction is right while the global one is wrong, or wrong
while the global one is right (complementary), weighs `complementary_weight` (2 in the code), the others 1 (consistent);
the sum is divided by regions x batch. SD-KD is weighted by `beta` (the code's KD_WEIGHT); SD-DKD by its own weights,
ramped up over `warmup_epochs` like DKD. With `levels: [1]`, the models' logits themselves (the code's M '[1]')."""

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from ..config.distill import FeatureParams, epoch_count
from ..losses import fp32
from .base import Term, register, warmup


def _regions(x: Tensor, levels: tuple[int, ...]) -> Tensor:
    """SPP: `x` (B, C, H, W) average-pooled to 4x4, then to each level's L x L from that; (B, C, regions), the levels
    in order, each level's cells row by row."""
    x4 = F.adaptive_avg_pool2d(x, 4)
    return torch.cat([F.adaptive_avg_pool2d(x4, level).flatten(2) for level in levels], 2)


def _region_logits(x: Tensor, head, levels: tuple[int, ...]) -> Tensor:
    """The classifier `head` on each region's pooled vector: (regions, B, classes)."""
    r = _regions(x, levels).permute(2, 0, 1)
    return head(r.reshape(-1, r.shape[2])).reshape(r.shape[0], r.shape[1], -1)


def _kd_rows(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """KL(softmax(t / T) || softmax(s / T)) of each row, times T^2."""
    kl = F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="none")
    return kl.sum(1) * temperature ** 2


def _dkd_rows(s: Tensor, t: Tensor, y: Tensor, alpha: float, beta: float, temperature: float) -> Tensor:
    """DKD of each row (mdistiller's dkd_loss without its batch mean): alpha TCKD + beta NCKD, each times T^2."""
    gt = F.one_hot(y, s.shape[1]).bool()
    ps, pt = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
    bs = torch.stack([ps[gt], ps.masked_fill(gt, 0).sum(1)], 1)
    bt = torch.stack([pt[gt], pt.masked_fill(gt, 0).sum(1)], 1)
    tckd = F.kl_div(bs.log(), bt, reduction="none").sum(1)
    nckd = F.kl_div(F.log_softmax(s / temperature - 1000.0 * gt, 1), F.softmax(t / temperature - 1000.0 * gt, 1),
                    reduction="none").sum(1)
    return (alpha * tckd + beta * nckd) * temperature ** 2


# the loss, a pure function (tensors in, a scalar out)
@fp32
def sdd(student_regions: Tensor, teacher_regions: Tensor, target: Tensor, base: str = "dkd", alpha: float = 1.0,
        beta: float = 8.0, temperature: float = 4.0, complementary_weight: float = 2.0) -> Tensor:
    """Wei et al. 2024 on region logits (regions, B, classes), region 0 the global one: the base loss of each region
    and sample (`base` "kd": KD; "dkd": alpha TCKD + beta NCKD), times T^2, weighted by `complementary_weight` where
    the teacher's prediction on the region and on the whole image disagree about the label (one right, the other
    wrong), 1 elsewhere; summed, divided by regions x batch."""
    n, b, k = student_regions.shape
    s, t, y = student_regions.reshape(n * b, k), teacher_regions.reshape(n * b, k), target.repeat(n)
    rows = _kd_rows(s, t, temperature) if base == "kd" else _dkd_rows(s, t, y, alpha, beta, temperature)
    right = teacher_regions.argmax(2) == target  # (regions, B): the teacher's region prediction is the label
    complementary = (right != right[:1]).reshape(-1)  # it disagrees with the global region's
    weights = torch.where(complementary, complementary_weight, 1.0).to(rows.dtype)
    return (weights * rows).sum() / (n * b)


class SDDParams(FeatureParams):
    """shicaiwei123/SDD-CVPR2024: the README's command (README.md:41: `train_origin.py --cfg
    configs/cifar100/sdd_dkd/res32x4_shuv1.yaml --M [1,2,4]`), SD-DKD with mdistiller's DKD defaults
    (mdistiller/engine/cfg.py:163-166) and train_origin.py:198's warm-up. Its per-pair configs
    (configs/cifar100/sdd_dkd/<pair>.yaml) set DKD.BETA 2.0 for resnet56->resnet20 and resnet110->resnet32, 6.0 for
    resnet32x4->mobilenetv2, vgg13->vgg8, vgg13->mobilenetv2, vgg13->shufflev1, wrn_40_2->wrn_16_2,
    wrn_40_2->wrn_40_1, wrn_40_2->mobilenetv2 (`by_pair`), and its scripts run M [1,2] for
    resnet32x4->resnet8x4 and vgg13->vgg8 (teacher_resnet32x4.sh, teacher_vgg.sh). SD-KD (`base: kd`):
    mdistiller's KD, CE 0.1 and KD 0.9 at T 4 (cfg.py:61-64): `gamma: 0.1, beta: 0.9`, no warm-up (KD.py:142)."""

    base: Literal["kd", "dkd"] = Field("dkd", description="the loss per region: KD (SD-KD) or DKD (SD-DKD, the "
                                                          "README's command)")
    gamma: float = Field(1.0, ge=0, description="CE's weight (cfg.py:163 DKD.CE_WEIGHT; SD-KD's: 0.1)")
    temperature: float = Field(4.0, gt=0, description="cfg.py:166 DKD.T (and :61 KD.TEMPERATURE)")
    beta: float = Field(8.0, ge=0, description="base dkd: NCKD's weight (cfg.py:165 DKD.BETA); base kd: the "
                                               "SD-KD term's weight (cfg.py:64 KD_WEIGHT 0.9)")
    tckd: float = Field(1.0, ge=0, description="base dkd: TCKD's weight (cfg.py:164 DKD.ALPHA)")
    warmup_epochs: int = epoch_count(20, ge=0, description="base dkd: the loss ramps up linearly over these epochs "
                                                     "(train_origin.py:198 --warmup 20)")
    levels: list[int] = Field([1, 2, 4], description="the scales M: [1, 2, 4], [1, 2] or [1] (README.md:41 --M)")
    complementary_weight: float = Field(2.0, ge=0, description="the weight of the complementary regions' losses "
                                                               "(SDD_DKD.py:114-115, KD.py:89-90), consistent: 1")

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if v not in ([1, 2, 4], [1, 2], [1]):
            raise ValueError("must be [1, 2, 4], [1, 2] or [1] (SDD's M: the global region first)")
        return v


@register("sdd", SDDParams)
class SDD(Term):
    weight_param = None  # beta (SD-KD's weight; SD-DKD's NCKD weight) and tckd weigh the loss inside
    uses_classifier = True  # the regions go through both models' classifiers

    def __init__(self, cfg, s_shapes, t_shapes, data=None):
        super().__init__()
        self.cfg = cfg
        self.levels = tuple(cfg.levels)
        if self.levels != (1,) and (s_shapes.final is None or t_shapes.final is None):
            raise ValueError("sdd pools the map each model's embedding averages and classifies the regions, which "
                             "kdpipe's models and torchvision's ResNets give (Features.final); this pair's "
                             f"{'student' if s_shapes.final is None else 'teacher'} does not")

    def forward(self, b):
        c = self.cfg
        if self.levels == (1,):  # the code's M '[1]': plain KD / DKD on the logits
            s_regions, t_regions = b.s_logits[None], b.t_logits[None]
        else:
            s_regions = _region_logits(b.s_final, b.s_classifier, self.levels)
            with torch.no_grad():
                t_regions = _region_logits(b.t_final, b.t_classifier, self.levels)
        loss = sdd(s_regions, t_regions, b.y, c.base, c.tckd, c.beta, c.temperature, c.complementary_weight)
        if c.base == "kd":
            return c.beta * loss
        return warmup(b.epoch, c.warmup_epochs) * loss
