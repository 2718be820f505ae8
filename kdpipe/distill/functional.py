"""What several methods' losses share, as pure functions (public API): KD's soft targets, the hint MSE,
logit standardisation, and the spatial matching of two feature maps. Each method's own loss is a pure function
at the top of its file (`kdpipe.distill.dkd.dkd`, `kdpipe.distill.nst.nst`, ...), so a method's DVC stages
depend on its file alone: editing DKD's loss re-runs the DKD distillations, no other method's.

Features are the stage maps (`stages`, e.g. `[f0, f1, f2, f3]`) and the pooled `embedding` of `model(x, features=True)`. Conventions follow the papers
as implemented in the CIFAR distillation literature (RepDistiller), so results compare with its tables.

Every loss is decorated with `@fp32` (kdpipe/losses.py): it computes in fp32 whatever autocast region
it is called from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import cross_entropy, fp32  # noqa: F401  (cross_entropy: the CE term, public here too)

Tensor = torch.Tensor


@fp32
def kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. 2015: KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over the
    batch ("batchmean"), times T^2 so that gradients keep their scale as T changes."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature ** 2


def match_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the spatially larger of two feature maps to the smaller one's size."""
    ha, hb = a.shape[-2:], b.shape[-2:]
    if ha[0] * ha[1] > hb[0] * hb[1]:
        a = F.adaptive_avg_pool2d(a, hb)
    elif hb[0] * hb[1] > ha[0] * ha[1]:
        b = F.adaptive_avg_pool2d(b, ha)
    return a, b


@fp32
def hint(fs_regressed: Tensor, ft: Tensor) -> Tensor:
    """Romero et al. 2015 (FitNets): mean squared error between the regressed student hint and the teacher's."""
    return F.mse_loss(fs_regressed, ft)


@fp32
def standardize(z: Tensor) -> Tensor:
    """Sun et al. 2024, logit standardisation: (z - mean) / (1e-7 + std) per row, std as `torch.std`
    (unbiased), the epsilon added to it (sunshangquan/logit-standardization-KD's `normalize`)."""
    return (z - z.mean(-1, keepdim=True)) / (1e-7 + z.std(-1, keepdim=True))
