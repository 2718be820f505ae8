"""Distillation methods behind a registry: one file per method, one objective that combines them.

loss = gamma * CE(student, labels) + alpha * KD(T) + sum over the other methods of beta * term.
Each method file registers a `Term` (an `nn.Module`) built as `Term(cfg, s_shapes, t_shapes, data)` (the `Shapes`
of the student's and the teacher's features) whose
`forward(b: Batch)` returns its unweighted loss; its trainable parts (regressors, embeddings, CRD's
memory) are its submodules and buffers, optimised and checkpointed with the student's run, never
exported with the student. A term may fix its own weight (`weight = 1.0`: DKD weighs its parts inside).

Init stage (RepDistiller's `init()`): a term whose params have `init_epochs > 0` first trains alone for that
many epochs, unweighted, on `init_loss(b)` (default: `forward`). What trains there and after is the term's
declaration, not a special case in the engine:
- `init_trains_student` (default True): the student's layers train in the init stage (FSP, AB, FitNets);
  False: the student is left untouched, run in eval mode without gradients (FT trains its paraphraser alone);
- `loss_after_init` (default False): whether the term is still in the main phase's loss (FT: True; FSP and
  AB: False, the student then trains with CE alone, as RepDistiller);
- `trainable_parts(phase)` (default: all its parameters): its own parameters the optimiser updates in that
  phase (AB's connectors train in the init stage only; FT's paraphraser there, its translator after).
A term that reads the pre-ReLU taps sets `uses_preact = True` (AB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..models import Features

REGISTRY: dict[str, type[nn.Module]] = {}


def register(name: str):
    def wrap(cls):
        REGISTRY[name] = cls
        cls.method = name
        return cls
    return wrap


class Term(nn.Module):
    """Base of every method term, with the defaults of the init-stage declarations described above."""

    init_trains_student = True
    loss_after_init = False
    uses_preact = False

    def init_loss(self, b):
        return self(b)

    def trainable_parts(self, phase: str):
        return self.parameters()


@dataclass
class TrainData:
    """What a term may need to know about the training set (CRD: its size and each sample's class)."""

    train_labels: torch.Tensor


class Batch:
    """Everything a term sees of one step: the models' `Features` (`s_feats`/`t_feats` are the stage maps,
    `s_embedding`/`t_embedding` the pooled pre-classifier vectors). `epoch` counts the main phase's epochs
    from 0 (DKD's warm-up); `index` holds each sample's position in the training set (CRD's memory bank)."""

    def __init__(self, s_out, t_out, y, index=None, epoch: int = 0):
        self.s_logits, self.s_feats, self.s_embedding = s_out.logits, s_out.stages, s_out.embedding
        self.t_logits, self.t_feats, self.t_embedding = t_out.logits, t_out.stages, t_out.embedding
        self.s_preact, self.t_preact = s_out.preact, t_out.preact  # the taps before their last ReLU (AB)
        self.y, self.index, self.epoch = y, index, epoch


class Shapes(NamedTuple):
    """A model's feature shapes: (C, H, W) of each stage map, and the embedding's width."""

    stages: list[tuple[int, int, int]]
    embedding: int


@torch.no_grad()
def feature_shapes(model: nn.Module, device="cpu") -> Shapes:
    """The shapes of `model`'s features for a CIFAR-sized input, without touching BN statistics."""
    was_training = model.training
    model.eval()
    out = model(torch.zeros(1, 3, 32, 32, device=device), features=True)
    model.train(was_training)
    return Shapes([tuple(f.shape[1:]) for f in out.stages], out.embedding.shape[1])


def check_paired_stages(method: str, s_shapes: Shapes, t_shapes: Shapes) -> None:
    """Stage-wise methods pair the student's i-th stage with the teacher's: both need as many."""
    if len(s_shapes.stages) != len(t_shapes.stages):
        raise ValueError(f"{method} pairs stages one to one, but the student has {len(s_shapes.stages)} "
                         f"feature taps and the teacher {len(t_shapes.stages)}")


from . import ab, at, cc, crd, dkd, fitnets, fsp, ft, kd, nst, pkt, rkd, sp, vid  # noqa: E402,F401  (fill the registry)
from . import functional as Fd  # noqa: E402


class Distiller(nn.Module):
    """The training objective of a distilled student (same interface as engine.CrossEntropy).

    The teacher is held outside the module tree: it is not optimised, not checkpointed with the
    student, and stays in eval mode. It runs under `torch.inference_mode()`; its outputs are cloned
    into ordinary tensors because autograd may save them for the backward pass (e.g. KD's target).
    """

    def __init__(self, teacher: nn.Module, methods: list[str], params, s_shapes, t_shapes,
                 data: TrainData | None = None, teacher_input: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        # (scale, shift) re-normalising the batch for a teacher trained with other input statistics
        # (an imported one): x_teacher = x * scale + shift, per channel
        self._teacher_input = teacher_input
        first = getattr(params, methods[0])
        kd_src = params.kd if "kd" in methods else first
        self.methods = methods
        self.gamma, self.alpha = first.gamma, kd_src.alpha
        self._teacher = (teacher.eval().requires_grad_(False),)
        self.terms = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        self.init_stage: dict[str, int] = {}  # method -> its init epochs
        if self.alpha > 0:
            self.terms["kd"] = REGISTRY["kd"](kd_src)
            self.weights["kd"] = self.alpha
        for m in methods:
            if m == "kd":
                continue
            cfg = getattr(params, m)
            self.terms[m] = REGISTRY[m](cfg, s_shapes, t_shapes, data)
            self.weights[m] = getattr(self.terms[m], "weight", cfg.beta)
            if getattr(cfg, "init_epochs", 0) > 0:
                self.init_stage[m] = cfg.init_epochs
        self.init_trains_student = any(self.terms[m].init_trains_student for m in self.init_stage)
        self.uses_preact = any(t.uses_preact for t in self.terms.values())

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def init_epochs(self) -> int:
        return max(self.init_stage.values(), default=0)

    def trainable(self, model: nn.Module, phase: str) -> list[nn.Parameter]:
        """What the optimiser updates in `phase`: the student (unless no init term trains it) and the
        terms' declared parts (in the init stage only the init terms')."""
        params = list(model.parameters()) if phase == "main" or self.init_trains_student else []
        for n, term in self.terms.items():
            if phase == "main" or n in self.init_stage:
                params += list(term.trainable_parts(phase))
        return params

    def forward(self, model, x, y, phase: str = "main", index=None, epoch: int = 0):
        with torch.inference_mode():
            xt = x if self._teacher_input is None else x * self._teacher_input[0] + self._teacher_input[1]
            t = self.teacher(xt, features=True)
        t = Features(t.logits.clone(), [f.clone() for f in t.stages], t.embedding.clone(),
                     [f.clone() for f in t.preact] if self.uses_preact else None)
        if phase == "init" and not self.init_trains_student:  # RepDistiller: model_s.eval(), not updated
            was_training = model.training
            model.eval()
            with torch.no_grad():
                s = model(x, features=True)
            model.train(was_training)
        else:
            s = model(x, features=True)
        b = Batch(s, t, y, index, epoch)
        if phase == "init":  # RepDistiller's init(): the init terms' own losses, unweighted
            return sum(self.terms[n].init_loss(b) for n in self.init_stage), s.logits
        loss = self.gamma * Fd.cross_entropy(s.logits, y)
        for n, w in self.weights.items():
            if n not in self.init_stage or self.terms[n].loss_after_init:
                loss = loss + w * self.terms[n](b)
        return loss, s.logits
