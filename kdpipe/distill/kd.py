"""KD: Hinton, Vinyals & Dean 2015, soft targets at temperature T (weight alpha); with `logit_std`, on
standardised logits (Sun et al. 2024). The term is `base.KDTerm`, which the objective also adds to any other
method whose alpha is > 0."""

from pydantic import Field

from ..config.distill import MethodParams, logit_std_field
from .base import KDTerm, register


class KDParams(MethodParams):
    gamma: float = Field(0.1, ge=0)
    alpha: float = Field(0.9, ge=0)
    temperature: float = Field(4.0, gt=0)
    logit_std: bool = logit_std_field()


@register("kd", KDParams)
class KD(KDTerm):
    pass
