"""CC: Peng et al. 2019, correlation congruence of linearly embedded vectors (RepDistiller's LinearEmbed,
feat_dim 128, one for the student and one for the teacher; both trained with the student)."""

from pydantic import Field
from torch import Tensor, nn

from ..config.distill import FeatureParams
from ..losses import fp32
from .base import Term, register


# the loss, a pure function (tensors in, a scalar out)
@fp32
def cc(es: Tensor, et: Tensor) -> Tensor:
    """Peng et al. 2019, correlation congruence as RepDistiller implements it (the authors' code): with
    d = |e_s - e_t|, the mean over consecutive sample pairs (i, i+1) of sum_k d_ik d_(i+1)k."""
    d = (es - et).abs()
    return (d[:-1] * d[1:]).sum(1).mean()


class CCParams(FeatureParams):
    beta: float = Field(0.02, ge=0)
    feat_dim: int = Field(128, ge=1, description="size of the linear embeddings")


@register("cc", CCParams)
class CorrelationCongruence(Term):
    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        self.embed_s = nn.Linear(s_shapes.embedding, cfg.feat_dim)
        self.embed_t = nn.Linear(t_shapes.embedding, cfg.feat_dim)

    def forward(self, b):
        return cc(self.embed_s(b.s_embedding), self.embed_t(b.t_embedding))
