"""What every method term builds on: the registry, `Term`, `Batch`, feature shapes and shared parts.

The registry is the list of methods (`METHODS`, one file each, kdpipe/distill/<name>.py, which registers its term
and its params schema). `get(name)` imports a method's file on first use; validating a params file imports them
all (kdpipe/config/distill.py builds the `distill` section from their schemas), while a run's results depend on its
own methods' files alone (a DVC stage depends on those and the shared ones, never on the other methods').
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from . import functional as Fd


# the methods, in the order of tables, params files and `--help` (a test ties it to the files)
METHODS = ("kd", "at", "nst", "fsp", "fitnets", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "crd", "dkd", "dist", "ctkd",
           "reviewkd", "mlkd", "ofd", "kdsvd", "dot", "wttm", "sdd", "wkd", "rld")
REGISTRY: dict[str, type["Term"]] = {}


def get(name: str) -> type["Term"]:
    """The term class of method `name`, importing its file on first use."""
    if name not in REGISTRY:
        importlib.import_module(f"{__package__}.{name}")
    return REGISTRY[name]


def register(name: str, params):
    """Register a term class as method `name` with its params schema (a `config.MethodParams`, the `distill.<name>`
    section); its file must be kdpipe/distill/<name>.py: the pipelines' distill stages depend on that file alone
    among the methods."""
    def wrap(cls):
        REGISTRY[name] = cls
        cls.method, cls.params = name, params
        cls.label = cls.label or name.upper()
        return cls
    return wrap


class Term(nn.Module):
    """Base of every method term: what it is called, what it can do, and the defaults of the init-stage
    declarations (see kdpipe/distill/__init__.py)."""

    label = ""  # its name in tables and plots (default: the method's name upper-cased)
    params: type  # its params schema, the `distill.<method>` section (set by `register`)
    supports_ddp = True  # False: refuses to run under torchrun
    init_trains_student = True
    loss_after_init = False
    uses_preact = False
    has_loss = True  # False: a term that changes how the student trains, not what it minimises (DOT)
    teacher_batch_stats = False  # True: the teacher's BN normalises with each batch's statistics (OFD)
    runs_alone = ""  # why no other term may run beside this one (OFD), or "": any combination
    runs_eager = ""  # why its student cannot run under runtime.compile (DOT): it runs eager, the reason logged
    weight_param: str | None = "beta"  # the params key weighing the term in the loss; None: 1 (it weighs its parts)
    views: tuple[str, ...] = ()  # extra views of each batch the source adds, e.g. ("strong",) (MLKD)
    uses_classifier = False  # True: the batch brings both models' final maps and classifiers (SDD)
    # a method's own optimiser for the main phase, optimizer(params, train_cfg) (DOT); one with a
    # `backward(terms)` runs the step's backward passes itself, from the loss's named terms, and returns the loss
    optimizer = None

    def bench_parts(self, batch_size: int, sample_index, device) -> dict:
        """Steps of the term's own machinery that `kdpipe bench` times apart (label -> step function);
        `sample_index()` draws a batch of dataset indices."""
        return {}

    def from_teacher(self, teacher: nn.Module, teacher_file=None) -> None:
        """What the term reads from the teacher once, before training: its weights (OFD's margins) or a file written
        for it (WKD's CKA cost beside `teacher_file`, the checkpoint's path where the run has one)."""

    def init_loss(self, b):
        return self(b)

    def trainable_parts(self, phase: str):
        return self.parameters()


def warmup(epoch: int, epochs: int) -> float:
    """A loss weight's linear warm-up: min(epoch / epochs, 1) with epochs counted from 1, as mdistiller's
    DKD and ReviewKD ramp theirs (`epoch` counts from 0 here); 1 throughout when `epochs` is 0."""
    return min((epoch + 1) / epochs, 1.0) if epochs else 1.0


def logits(b: "Batch", cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's logits a logit method reads: standardised per row when its params say
    `logit_std: true` (Sun et al. 2024; cross-entropy keeps the raw logits)."""
    # the KD term a method adds with alpha > 0 is built from that method's params: standardised with dkd's or
    # dist's `logit_std`, raw for the feature methods (no such key)
    if getattr(cfg, "logit_std", False):
        return Fd.standardize(b.s_logits), Fd.standardize(b.t_logits)
    return b.s_logits, b.t_logits


class KDTerm(Term):
    """Hinton et al.'s KD at temperature T, on standardised logits with `logit_std`: the term the objective adds to
    any method whose params say alpha > 0 (from `kd`'s params when `kd` is among the methods, else the first's)."""

    label = "KD"
    weight_param = "alpha"

    def __init__(self, cfg, s_shapes=None, t_shapes=None, data=None):
        super().__init__()
        self.cfg = cfg

    def forward(self, b):
        s, t = logits(b, self.cfg)
        return Fd.kd(s, t, self.cfg.temperature)


@contextmanager
def batch_statistics(model: nn.Module, on: bool = True):
    """Within: `model`'s BN layers normalise with each batch's statistics and leave their running ones untouched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if on else []
    saved = [(m.training, m.track_running_stats) for m in bns]
    for m in bns:
        m.training, m.track_running_stats = True, False
    try:
        yield
    finally:
        for m, (training, track) in zip(bns, saved):
            m.training, m.track_running_stats = training, track


@dataclass
class TrainData:
    """What a term may need to know about the training set (CRD: its size and each sample's class)."""

    train_labels: torch.Tensor


class Batch:
    """Everything a term sees of one step: the models' `Features` (`s_feats`/`t_feats` are the stage maps,
    `s_embedding`/`t_embedding` the pooled pre-classifier vectors, `s_final`/`t_final` the maps those are the
    global averages of, or None). `epoch` counts the main phase's epochs
    from 0 (DKD's warm-up); `index` holds each sample's position in the training set (CRD's memory bank);
    `views` the student's and the teacher's logits on each extra view, e.g. views["strong"] = (s, t) (MLKD);
    `classifiers` the student's and the teacher's classifier layers (the student's trains through the term's
    loss too), for a term that declares `uses_classifier` (SDD)."""

    def __init__(self, s_out, t_out, y, index=None, epoch: int = 0, views: dict | None = None,
                 classifiers: tuple | None = None):
        self.s_logits, self.s_feats, self.s_embedding = s_out.logits, s_out.stages, s_out.embedding
        self.t_logits, self.t_feats, self.t_embedding = t_out.logits, t_out.stages, t_out.embedding
        self.s_preact, self.t_preact = s_out.preact, t_out.preact  # the taps before their last ReLU (AB)
        self.s_final, self.t_final = getattr(s_out, "final", None), getattr(t_out, "final", None)
        self.s_classifier, self.t_classifier = classifiers or (None, None)
        self.y, self.index, self.epoch, self.views = y, index, epoch, views or {}


class Shapes(NamedTuple):
    """A model's feature shapes: (C, H, W) of each stage map, the embedding's width, and (C, H, W) of the map
    the embedding is the global average of (`Features.final`; None where the model does not give it)."""

    stages: list[tuple[int, int, int]]
    embedding: int
    final: tuple[int, int, int] | None = None


@torch.no_grad()
def feature_shapes(model: nn.Module, device="cpu", image_size: int = 32) -> Shapes:
    """The shapes of `model`'s features for an input of `image_size`, without touching BN statistics."""
    was_training = model.training
    model.eval()
    out = model(torch.zeros(1, 3, image_size, image_size, device=device), features=True)
    model.train(was_training)
    final = getattr(out, "final", None)
    return Shapes([tuple(f.shape[1:]) for f in out.stages], out.embedding.shape[1],
                  None if final is None else tuple(final.shape[1:]))


def check_paired_stages(method: str, s_shapes: Shapes, t_shapes: Shapes) -> None:
    """Stage-wise methods pair the student's i-th stage with the teacher's: both need as many."""
    if len(s_shapes.stages) != len(t_shapes.stages):
        raise ValueError(f"{method} pairs stages one to one, but the student has {len(s_shapes.stages)} "
                         f"feature taps and the teacher {len(t_shapes.stages)}")


def regressor(s_shape, t_shape, kernel: int = 1, relu: bool = True) -> nn.Sequential:
    """RepDistiller's `ConvReg`: conv (with bias) + BN + ReLU from the student's hint (C_s, H_s, W_s) to
    the teacher's (C_t, H_t, W_t). A student map twice as large: 3x3 stride 2; half as large: 4x4
    transposed conv stride 2; otherwise (H_s >= H_t) a (1+H_s-H_t) x (1+W_s-W_t) conv, i.e. 1x1 for
    equal sizes. `kernel=3` is a kdpipe variant for equal sizes (3x3, padding 1). `relu=False`: conv + BN
    (`ConvReg(use_relu=False)`, AB's connectors)."""
    (cs, hs, ws), (ct, ht, wt) = s_shape, t_shape
    if hs == 2 * ht:
        conv = nn.Conv2d(cs, ct, 3, 2, 1)
    elif 2 * hs == ht:
        conv = nn.ConvTranspose2d(cs, ct, 4, 2, 1)
    elif (hs, ws) == (ht, wt):
        conv = nn.Conv2d(cs, ct, kernel, 1, kernel // 2)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
    else:
        raise ValueError(f"fitnets: no regressor from a {hs}x{ws} student hint to a {ht}x{wt} teacher hint")
    return nn.Sequential(conv, nn.BatchNorm2d(ct), *([nn.ReLU(inplace=True)] if relu else []))
