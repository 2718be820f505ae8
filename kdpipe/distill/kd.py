"""KD: Hinton, Vinyals & Dean 2015, soft targets at temperature T (weight alpha); with `logit_std`, on
standardised logits (Sun et al. 2024). The term is `base.KDTerm`, which the objective also adds to any other
method whose alpha is > 0."""

from .base import KDTerm, register


@register("kd")
class KD(KDTerm):
    pass
