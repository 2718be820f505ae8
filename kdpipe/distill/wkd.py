"""WKD: Lv, Yang & Li 2024, "Wasserstein Distance Rivals Kullback-Leibler Divergence for Knowledge Distillation"
(NeurIPS 2024), as its authors' code computes it (JiamingLv/WKD, `mdistiller/distillers/WKD.py`):
- WKD-L (weight `beta`): the target class's teacher probability times the student's log-probability (softmax at
  T 1, `loss_t`), plus beta times the discrete Wasserstein distance between the student's and the teacher's
  distributions over the non-target classes (softmax at `temperature`), computed by `sinkhorn_iters` Sinkhorn
  iterations at entropic regularisation `sinkhorn_lambda`. The ground cost between two classes is 1 minus the
  cosine similarity of the teacher's classifier weights (the code's COST_MATRIX "fc"), sharpened as 1 - exp(-s d);
- WKD-F (weight `feat_weight`, off at 0): the student's `hint_layer` map through a regressor (ConvReg, or the
  code's bottleneck), then the Wasserstein distance between diagonal Gaussians of the teacher's and the
  student's channels, per cell of a `grid` x `grid` split: mean_cov_ratio * |mu_s - mu_t|^2 + |sigma_s - sigma_t|^2.
Both weights decay along a cosine after `decay_start` epochs, to 0 at `decay_end` (the code's COSINE_DECAY_EPOCH
and SOLVER.EPOCHS); `loss_t` keeps weight 1.
WKD-L's class cost (`cost`): the code's COST_MATRIX "fc" above, read from the teacher, or "cka", which every published
figure used: 1 - linear CKA between the teacher's per-class features over the training set (the code's
tools/generate_class_proto.py and tools/generate_cost_matrix.py), a file per teacher that `kdpipe wkd-cost` writes
once (`write_cost`, its own DVC stage in the pipelines) and every WKD run of that teacher reads (`cost_file`)."""

import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..config.distill import FeatureParams, epoch_count
from ..config.errors import Error
from ..losses import fp32
from ..models import classifier
from .base import Term, register, regressor


def _sinkhorn(w1: Tensor, w2: Tensor, cost: Tensor, reg: float, iters: int) -> Tensor:
    """The transport plan between the rows of `w1` and `w2` (B, n) under `cost` (B, n, n): Sinkhorn's scaling of
    K = exp(-cost / reg), u from 1/n, `iters` times v = w2 / (K^T u), u = w1 / (K v), each denominator + 1e-8."""
    k = torch.exp(-cost / reg)
    u = torch.full_like(w1, 1.0 / w1.shape[1])
    for _ in range(iters):
        v = w2 / (torch.einsum("bij,bi->bj", k, u) + 1e-8)
        u = w1 / (torch.einsum("bij,bj->bi", k, v) + 1e-8)
    return u[:, :, None] * k * v[:, None, :]


# the losses, pure functions (tensors in, a scalar out)
@fp32
def wkd_logit(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, cost: Tensor, temperature: float = 8.0,
              wd_weight: float = 600.0, sinkhorn_lambda: float = 0.05, sinkhorn_iters: int = 10) -> Tensor:
    """WKD-L (WKD.py's wkd_logit_loss_with_speration): -mean(p_t[y] * log p_s[y]) at T 1 (p_t[y] a constant), plus
    `wd_weight` times the batch mean of the entropic Wasserstein distance sum(plan * cost) between the softmaxes at
    `temperature` of the non-target logits, under `cost` (C x C, the non-target rows and columns, ReLU + 1e-8)."""
    n, c = student_logits.shape
    y = target[:, None]
    pt_y = F.softmax(teacher_logits, 1).gather(1, y).detach()
    target_term = -(pt_y * F.log_softmax(student_logits, 1).gather(1, y)).mean()
    other = torch.ones_like(student_logits, dtype=torch.bool).scatter_(1, y, False)
    ps = F.softmax(student_logits[other].reshape(n, c - 1) / temperature, 1)
    pt = F.softmax(teacher_logits[other].reshape(n, c - 1) / temperature, 1)
    pair = other[:, :, None] & other[:, None, :]
    cost = F.relu(cost.expand(n, c, c)[pair].reshape(n, c - 1, c - 1)) + 1e-8
    plan = _sinkhorn(ps, pt, cost, sinkhorn_lambda, sinkhorn_iters)
    return target_term + wd_weight * (plan * cost).sum((1, 2)).mean()


def _cells(f: Tensor, grid: int) -> list[Tensor]:
    """The grid x grid cells of `f` (B, C, H, W), with adaptive pooling's bounds: floor(i H / g) to
    ceil((i + 1) H / g)."""
    h, w = f.shape[-2:]
    rows = [(i * h // grid, -(-(i + 1) * h // grid)) for i in range(grid)]
    cols = [(j * w // grid, -(-(j + 1) * w // grid)) for j in range(grid)]
    return [f[:, :, r0:r1, c0:c1] for r0, r1 in rows for c0, c1 in cols]


@fp32
def wkd_feature(fs: Tensor, ft: Tensor, mean_cov_ratio: float = 4.0, grid: int = 1, eps: float = 1e-5) -> Tensor:
    """WKD-F (WKD.py's wkd_feature_loss): per cell of a grid x grid split, each channel's mean and standard deviation
    sqrt(var + eps) (var unbiased, over the cell's positions); mean_cov_ratio * the squared distance of the means
    plus that of the deviations, summed over channels and cells, divided by grid^2 x batch."""
    mean, std = 0.0, 0.0
    for cs, ct in zip(_cells(fs, grid), _cells(ft, grid)):
        mean = mean + (cs.mean((2, 3)) - ct.mean((2, 3))).pow(2).sum()
        std = std + ((cs.var((2, 3)) + eps).sqrt() - (ct.var((2, 3)) + eps).sqrt()).pow(2).sum()
    n = grid * grid * fs.shape[0]
    return mean_cov_ratio * mean / n + std / n


def cosine_decay(epoch: int, start: int, end: int) -> float:
    """WKD's loss weights' factor at `epoch` (from 0; the code counts from 1): 1 up to `start`, then
    (1 + cos(pi (e - start) / (end - start))) / 2, 0 from `end` on."""
    e = min(epoch + 1, end)
    return 0.5 * (1 + math.cos((e - start) / (end - start) * math.pi)) if e > start else 1.0


# the class cost from the teacher's features (COST_MATRIX 'cka'), as the authors' tools compute it offline
def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """tools/generate_cost_matrix.py:52-67 (linear_CKA_precenter): `x`, `y` (n, d), each centred over its rows;
    ||y^T x||_F^2 / (||x^T x||_F ||y^T y||_F)."""
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    return torch.norm(y.t() @ x, p="fro") ** 2 / (torch.norm(x.t() @ x, p="fro") * torch.norm(y.t() @ y, p="fro"))


def cka_cost(classes: list[Tensor]) -> Tensor:
    """generate_cost_matrix.py:133-141: 1 - linear CKA of each two classes' feature matrices (rows paired by their
    order), computed for i <= j and mirrored."""
    k = len(classes)
    cost = torch.zeros(k, k, device=classes[0].device)
    for i in range(k):
        for j in range(i, k):
            cost[i, j] = cost[j, i] = 1 - linear_cka(classes[i], classes[j])
    return cost


@torch.no_grad()
def class_features(teacher: nn.Module, batches, num_classes: int, features: str) -> list[Tensor]:
    """tools/generate_class_proto.py:33-68: per class, the teacher's last stage map (`features` "stage": the code's
    feats["feats"][-1], CIFAR's --feature_type feature) or its logits ("logits": the code's default, ImageNet's) of
    the training images of `batches` ((x, y) in the data's order), a map (m, C, H, W) as (m H W, C), each image's
    positions in row-major order. Every class cut to the smallest one's count (the code cuts the logits so; its maps
    need equal counts, as CIFAR's are)."""
    per_class: list[list[Tensor]] = [[] for _ in range(num_classes)]
    for x, y in batches:
        out = teacher(x, features=True)
        f = (out.stages[-1] if features == "stage" else out.logits).float()
        f = f.flatten(2).transpose(1, 2) if f.dim() == 4 else f  # (B, H W, C) or (B, classes)
        for i, c in enumerate(y.tolist()):
            per_class[c].append(f[i])
    m = min(len(p) for p in per_class)
    if m == 0:
        raise Error(f"wkd-cost: class {next(c for c, p in enumerate(per_class) if not p)} has no training image")
    return [torch.stack(p[:m]).reshape(-1, p[0].shape[-1]) for p in per_class]


def cost_file(teacher: Path) -> Path:
    """Where the CKA cost of the teacher checkpoint `teacher` lies: beside it, models/NAME.wkd-cost.pt."""
    return teacher.with_name(teacher.name.removesuffix(".pt") + ".wkd-cost.pt")


def write_cost(teacher: Path, data_dir: Path, cfg, features: str, imported: Path | None = None) -> Path:
    """`kdpipe wkd-cost`: the CKA cost of `teacher` on the training data of `data_dir`, with the evaluation's settings
    `cfg` (exact fp32 on its device, its batch size and workers), written to `cost_file(teacher)` with the teacher's
    sha256 and `features`; or, `imported`, the authors' file for a published teacher (wkd_cost_matrix/...pth)."""
    from .. import checkpoint, runs, sources
    from ..data import file_sha256
    from ..runtime import Numerics, resolve_device

    numerics = Numerics(resolve_device(cfg.device), bf16=False, channels_last=False)
    source = sources.open_source(data_dir, numerics, cfg.workers)
    ckpt, model, teacher_input, sha256 = runs.load_teacher(teacher, source, data_dir, numerics)
    k = ckpt["num_classes"]
    if imported is not None:
        cost = checkpoint.read_weights(imported)
        if not isinstance(cost, Tensor) or tuple(cost.shape) != (k, k):
            raise checkpoint.CheckpointError(f"{imported}: not a {k} x {k} cost matrix (the authors' linear_cka.pth for "
                                             f"a {k}-class teacher)")
        origin = {"imported": imported.name, "sha256": file_sha256(imported)}
    else:
        model.eval()

        def batches():  # the training images in their order, at the evaluation view, as the teacher sees its input
            for x, y in source.pixels("train", cfg.batch_size):
                x = source.normalise(x.to(numerics.device))
                yield (x if teacher_input is None else x * teacher_input[0] + teacher_input[1]), y

        cost = cka_cost(class_features(model, batches(), k, features))
        origin = {"computed": "linear CKA of the teacher's class features on the training data"}
    out = cost_file(teacher)
    checkpoint.atomic_save({"cost": cost.float().cpu(), "teacher_sha256": sha256, "features": features, **origin}, out)
    return out


class _Bottleneck(nn.Sequential):
    """WKD's ConvRegBottleNeck for maps of equal size (_common.py): 1x1 to `hidden`, 3x3, 1x1 to the teacher's
    channels (convolutions with bias), BN, ReLU."""

    def __init__(self, c_s: int, c_t: int, hidden: int = 256):
        super().__init__(nn.Conv2d(c_s, hidden, 1), nn.Conv2d(hidden, hidden, 3, 1, 1), nn.Conv2d(hidden, c_t, 1),
                         nn.BatchNorm2d(c_t), nn.ReLU(inplace=True))


class WKDParams(FeatureParams):
    """JiamingLv/WKD, its CIFAR-100 configs for ResNet-32x4 -> ResNet-8x4 (line numbers of configs/cifar100/...):
    WKD-L from wkd_l/res32x4_res8x4.yaml, WKD-F's shape from wkd_f/res32x4_res8x4.yaml (its weight 0.08 there;
    WKD-L+F: wkd_lf/, logit weight 200, feature 0.08, MEAN_COV_RATIO 8). WRN-40-2 -> ShuffleNetV1: WKD-L weight 200 at
    T 6 (wkd_l/wrn40_2_shuv1.yaml:23,32), WKD-F 0.3 with ratio 3 on a 4x4 grid (wkd_f/wrn40_2_shuv1.yaml:24,28,30).
    The configs' cost is COST_MATRIX 'cka' (`cost: cka`, what the pipelines set); the default here is the code's
    other one, 'fc', which needs no file."""

    beta: float = Field(600.0, ge=0, description="weight of WKD-L's Wasserstein distance (WKD_LOGIT_WEIGHT, "
                                                 "wkd_l/res32x4_res8x4.yaml:23); 0: no WKD-L")
    temperature: float = Field(8.0, gt=0, description="WKD-L's temperature (res32x4_res8x4.yaml:32)")
    sinkhorn_lambda: float = Field(0.05, gt=0, description="Sinkhorn's entropic regularisation (yaml:27)")
    sinkhorn_iters: int = Field(10, ge=1, description="Sinkhorn's iterations (yaml:28)")
    cost: Literal["classifier", "cka"] = Field("classifier", description="WKD-L's class cost: 1 - cos of the teacher's "
                                              "classifier rows (COST_MATRIX 'fc', WKD.py:142-148), or 1 - linear CKA "
                                              "of its class features (COST_MATRIX 'cka', every published config's, "
                                              "e.g. wkd_l/res32x4_res8x4.yaml:29): `kdpipe wkd-cost` writes it")
    cka_features: Literal["stage", "logits"] = Field("stage", description="cka: the teacher's last stage map (CIFAR's, "
                                                     "generate_cost_matrix.sh:11) or its logits (ImageNet's, :4)")
    cost_sharpen: float = Field(1.0, ge=0, description="cost = 1 - exp(-s * d), d the cost above; 0: d (yaml:31, "
                                                       "WKD.py:154-157)")
    decay_start: int = epoch_count(150, ge=0, description="the weights decay along a cosine after this epoch "
                                                    "(COSINE_DECAY_EPOCH, yaml:25; the code's default 0) ...")
    decay_end: int = epoch_count(240, ge=1, description="... to 0 at this one (the run's SOLVER.EPOCHS, yaml:12)")
    feat_weight: float = Field(0.0, ge=0, description="weight of WKD-F (WKD_FEAT_WEIGHT: 0 in wkd_l/, 0.08 in "
                                                      "wkd_f/res32x4_res8x4.yaml:24); 0: no WKD-F")
    hint_layer: int = Field(-1, ge=-5, le=4, description="WKD-F's stage tap (HINT_LAYER -1: the last)")
    projector: Literal["conv1x1", "bottleneck"] = Field("conv1x1", description="WKD-F's regressor: RepDistiller's "
                                                        "ConvReg (CIFAR's PROJECTOR) or the code's bottleneck (its default)")
    mean_cov_ratio: float = Field(4.0, ge=0, description="WKD-F: weight of the means' term (wkd_f/res32x4_res8x4.yaml:28)")
    grid: int = Field(1, ge=1, description="WKD-F: the maps split into grid x grid cells (SPATIAL_GRID, yaml:30)")
    eps: float = Field(1e-5, gt=0, description="WKD-F: sigma = sqrt(var + eps) (EPS, yaml:26)")

    @model_validator(mode="after")
    def _decay(self):
        if self.decay_end <= self.decay_start:
            raise ValueError("decay_end must be after decay_start")
        return self


@register("wkd", WKDParams)
class WKD(Term):
    weight_param = None  # beta and feat_weight weigh the parts inside

    def __init__(self, cfg, s_shapes, t_shapes, data=None):
        super().__init__()
        self.cfg = cfg
        if cfg.feat_weight > 0:
            s, t = s_shapes.stages[cfg.hint_layer], t_shapes.stages[cfg.hint_layer]
            if cfg.projector == "bottleneck":
                if s[1:] != t[1:]:
                    raise ValueError(f"wkd: the bottleneck projector needs equal map sizes at hint_layer "
                                     f"{cfg.hint_layer}, student {s[1]}x{s[2]}, teacher {t[1]}x{t[2]}")
                self.regressor = _Bottleneck(s[0], t[0])
            else:
                try:
                    self.regressor = regressor(s, t)  # WKD's ConvReg is RepDistiller's, with BN and ReLU
                except ValueError as e:
                    raise ValueError(f"wkd: {str(e).removeprefix('fitnets: ')}") from None

    def from_teacher(self, teacher: nn.Module, teacher_file: Path | None = None) -> None:
        """The class cost of WKD-L: 1 - cos of the teacher's classifier rows (WKD.py:142-148) or the CKA cost file of
        `teacher_file` (:150-152), sharpened (:154-157)."""
        if self.cfg.beta <= 0:
            return
        if self.cfg.cost == "cka":
            self.register_buffer("cost", self._sharpen(self._cka_cost(teacher_file)), persistent=False)
            return
        head = classifier(teacher)
        if head is None:
            raise ValueError(f"wkd: its class cost reads the teacher's classifier, which {type(teacher).__name__} "
                             "does not name (kdpipe's models and torchvision's ResNets do)")
        with torch.no_grad():
            w = F.normalize(head.weight.float(), dim=1)
            cost = 1 - w @ w.t()
        self.register_buffer("cost", self._sharpen(cost), persistent=False)

    def _sharpen(self, cost: Tensor) -> Tensor:
        return 1 - torch.exp(-self.cfg.cost_sharpen * cost) if self.cfg.cost_sharpen else cost

    def _cka_cost(self, teacher_file: Path | None) -> Tensor:
        """The cost `kdpipe wkd-cost` wrote for this teacher, checked to be of this teacher and these features."""
        from ..checkpoint import CheckpointError, read_weights
        from ..data import file_sha256

        if teacher_file is None:
            raise ValueError("wkd: cost cka reads the teacher's cost file, and this run names no teacher file")
        path = cost_file(Path(teacher_file))
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; WKD's cost cka needs it: run `kdpipe wkd-cost --teacher "
                                  f"{teacher_file}` first")
        saved = read_weights(path)
        if saved.get("teacher_sha256") != file_sha256(Path(teacher_file)):
            raise CheckpointError(f"{path}: computed for another teacher than {teacher_file}: run `kdpipe wkd-cost` again")
        if "computed" in saved and saved.get("features") != self.cfg.cka_features:
            raise CheckpointError(f"{path}: CKA of the teacher's {saved.get('features')}, but distill.wkd.cka_features is "
                                  f"{self.cfg.cka_features}: run `kdpipe wkd-cost` again")
        return saved["cost"]

    def forward(self, b):
        c = self.cfg
        decay = cosine_decay(b.epoch, c.decay_start, c.decay_end)
        loss = torch.zeros((), device=b.s_logits.device)
        if c.beta > 0:
            loss = loss + wkd_logit(b.s_logits, b.t_logits, b.y, self.cost, c.temperature, c.beta * decay,
                                    c.sinkhorn_lambda, c.sinkhorn_iters)
        if c.feat_weight > 0:
            fs = self.regressor(b.s_feats[c.hint_layer])
            ft = b.t_feats[c.hint_layer]
            loss = loss + c.feat_weight * decay * wkd_feature(fs, ft, c.mean_cov_ratio, c.grid, c.eps)
        return loss
