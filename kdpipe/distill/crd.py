"""CRD: Tian et al. 2020, contrastive representation distillation (RepDistiller's `crd/`).

Student and teacher embeddings (linear to feat_dim, L2-normalised; both trained with the student) are
contrasted against a memory bank of every training sample's past embeddings: for each sample, its own
memory entry is the positive and `nce_k` entries of samples of *other classes* are negatives (RepDistiller's
default 'exact' mode). Both directions (teacher anchor vs student memory, student anchor vs teacher
memory) add up. After each step the anchors' memory rows move to momentum * old + (1 - momentum) * new,
re-normalised. Memory, normalisation constants Z and the sampling counter are buffers, so they are
checkpointed with the resume state and a resumed run ends bit-identical.

Negatives are drawn as RepDistiller's `dataset/cifar100.py` draws them, `np.random.choice(cls_negative[target],
nce_k, replace=nce_k > len(cls_negative[target]))`: without replacement unless nce_k exceeds the class's negatives,
batched on the device, from a counter-seeded generator so sampling is reproducible.
"""

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config.distill import FeatureParams
from ..losses import fp32
from ..models.base import Features
from .base import Batch, Term, register


# the loss and the scores it takes, pure functions (tensors in, tensors out)
@fp32
def nce(scores: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    """CRD's contrastive (NCE) loss, Eq. 18: `scores` (B, 1 + K) are exp(<u, v> / T) / Z with the positive
    first; with noise probability P_n = 1 / n_data, -(sum log h(pos) + sum log(1 - h(neg))) / B where
    h(x) = x / (x + K P_n)."""
    k = scores.shape[1] - 1
    m = k / n_data
    pos, neg = scores[:, 0], scores[:, 1:]
    return -((pos / (pos + m + eps)).log().sum() + (m / (neg + m + eps)).log().sum()) / scores.shape[0]


@fp32
def contrast_scores(anchor: Tensor, memory: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """CRD's unnormalised scores exp(<memory[idx[b, j]], anchor[b]> / T), (B, 1 + K), for anchors (B, D),
    a memory bank (N, D) and sampled indices (B, 1 + K). Computed as one (B, N) matrix product and a
    gather of the sampled scores: a GEMM instead of gathering B x (1 + K) x D memory rows, which made
    the memory traffic dominate the step (same dot products)."""
    return torch.exp((anchor @ memory.t()).gather(1, idx) / temperature)


class Embed(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.normalize(self.linear(x), dim=1)


class NegativeSampler(nn.Module):
    """Indices of samples of other classes, uniformly, vectorised: with the training set sorted by class
    (class c at positions [start_c, start_c + n_c)), draw positions r in [0, N - n_c) and skip the class's block.
    A row's k positions are distinct (the k smallest of uniform keys over its N - n_c candidates: a uniform
    k-subset), or drawn with replacement where k exceeds N - n_c."""

    def __init__(self, labels: torch.Tensor, seed: int):
        super().__init__()
        labels = labels.long().cpu()
        counts = torch.bincount(labels)
        self.register_buffer("order", torch.argsort(labels, stable=True))
        self.register_buffer("start", torch.cumsum(counts, 0) - counts)
        self.register_buffer("count", counts)
        self.register_buffer("labels", labels)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # resumable: the draw counter
        self.seed = seed

    def forward(self, index: torch.Tensor, k: int) -> torch.Tensor:
        dev = index.device
        g = torch.Generator(device=dev).manual_seed(self.seed * 1_000_003 + int(self.step))
        self.step += 1
        c = self.labels[index]
        n_other = (len(self.labels) - self.count[c])[:, None]
        replace = k > n_other  # (B, 1): the rows RepDistiller draws with replacement

        def with_replacement():
            return (torch.rand(len(index), k, generator=g, device=dev) * n_other).long().clamp_max(n_other - 1)

        if bool(replace.all()):
            r = with_replacement()
        else:  # k <= the largest N - n_c of the batch
            keys = torch.rand(len(index), int(n_other.max()), generator=g, device=dev)
            keys.masked_fill_(torch.arange(keys.shape[1], device=dev) >= n_other, 2.0)  # beyond a row's candidates
            r = keys.topk(k, dim=1, largest=False, sorted=False).indices  # unsorted: half the cost, same set
            if bool(replace.any()):
                r = torch.where(replace, with_replacement(), r)
        r = r + (r >= self.start[c][:, None]) * self.count[c][:, None]
        return self.order[r]


class CRDParams(FeatureParams):
    beta: float = Field(0.8, ge=0)
    feat_dim: int = Field(128, ge=1, description="size of the L2-normalised embeddings")
    nce_k: int = Field(16384, ge=1, description="negatives per sample")
    nce_t: float = Field(0.07, gt=0, description="temperature")
    nce_m: float = Field(0.5, ge=0, lt=1, description="momentum of the memory-bank update")


@register("crd", CRDParams)
class ContrastiveRepresentation(Term):
    supports_ddp = False  # each process would update its own memory bank

    def __init__(self, cfg, s_shapes, t_shapes, data):
        super().__init__()
        if data is None:
            raise ValueError("crd needs the training labels (the engine passes them)")
        self.k, self.t, self.momentum = cfg.nce_k, cfg.nce_t, cfg.nce_m
        self.dims = (s_shapes.embedding, t_shapes.embedding)
        self.embed_s = Embed(s_shapes.embedding, cfg.feat_dim)
        self.embed_t = Embed(t_shapes.embedding, cfg.feat_dim)
        n = len(data.train_labels)
        self.n_data = n
        seed = int(torch.randint(2**31 - 1, ()))  # from the run's seeded global generator
        g = torch.Generator().manual_seed(seed)
        stdv = 1.0 / math.sqrt(cfg.feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n, cfg.feat_dim, generator=g) * 2 * stdv - stdv)
        self.register_buffer("memory_t", torch.rand(n, cfg.feat_dim, generator=g) * 2 * stdv - stdv)
        self.register_buffer("z", torch.full((2,), -1.0))  # normalisation constants, set at the first step
        self.sampler = NegativeSampler(data.train_labels, seed)

    def forward(self, b):
        if b.index is None:
            raise ValueError("crd needs each sample's dataset index")
        vs, vt = self.embed_s(b.s_embedding).float(), self.embed_t(b.t_embedding).float()
        idx = torch.cat([b.index[:, None], self.sampler(b.index, self.k)], 1)  # positive first
        out_t = contrast_scores(vt, self.memory_s, idx, self.t)  # teacher anchor against the student memory
        out_s = contrast_scores(vs, self.memory_t, idx, self.t)  # student anchor against the teacher memory
        if self.z[0] < 0:  # RepDistiller: Z = mean score x N, fixed from the first batch on
            self.z.copy_(torch.stack([out_s.detach().mean(), out_t.detach().mean()]) * self.n_data)
        loss = nce(out_s / self.z[0], self.n_data) + nce(out_t / self.z[1], self.n_data)
        if self.training:
            with torch.no_grad():
                for name, v in (("memory_s", vs), ("memory_t", vt)):
                    memory = getattr(self, name)
                    new = F.normalize(memory[b.index] * self.momentum + v.detach() * (1 - self.momentum), dim=1)
                    # out of place: the scores' backward still needs the bank as it was (one N x D copy,
                    # far less traffic than gathering B x (1 + K) x D rows)
                    setattr(self, name, memory.index_copy(0, b.index, new))
        return loss

    def bench_parts(self, batch_size, sample_index, device):
        def memory_step():  # the memory bank alone: negative sampling, scores of both directions, update
            with torch.no_grad():
                self.train()(Batch(Features(None, [], torch.randn(batch_size, self.dims[0], device=device)),
                                   Features(None, [], torch.randn(batch_size, self.dims[1], device=device)),
                                   None, sample_index()))
        return {"memory bank: sample + gather + update": memory_step}
