"""Distillation methods behind a registry: one file per method, one objective that combines them.

loss = gamma * CE(student, labels) + alpha * KD(T) + sum over feature methods of beta * term.
Each method file registers an `nn.Module` term whose `forward(s_logits, s_feats, t_logits, t_feats)`
returns the unweighted loss; trainable parts (the FitNets regressor) are its submodules.
"""

from __future__ import annotations

import torch
from torch import nn

REGISTRY: dict[str, type[nn.Module]] = {}


def register(name: str):
    def wrap(cls):
        REGISTRY[name] = cls
        cls.method = name
        return cls
    return wrap


from . import at, fitnets, fsp, kd, nst  # noqa: E402,F401  (fill the registry)
from . import functional as Fd  # noqa: E402


@torch.no_grad()
def feature_shapes(model: nn.Module, device="cpu") -> list[tuple[int, int, int]]:
    """(C, H, W) of each tap for a CIFAR-sized input, without touching BN statistics."""
    was_training = model.training
    model.eval()
    _, feats = model(torch.zeros(1, 3, 32, 32, device=device), features=True)
    model.train(was_training)
    return [tuple(f.shape[1:]) for f in feats]


class Distiller(nn.Module):
    """The training objective of a distilled student (same interface as engine.CrossEntropy).

    The teacher is held outside the module tree: it is not optimised, not checkpointed with the
    student, and stays in eval mode. It runs under `torch.inference_mode()`; its outputs are cloned
    into ordinary tensors because autograd may save them for the backward pass (e.g. KD's target).
    """

    def __init__(self, teacher: nn.Module, methods: list[str], params, s_shapes, t_shapes):
        super().__init__()
        first = getattr(params, methods[0])
        kd_src = params.kd if "kd" in methods else first
        self.methods = methods
        self.gamma, self.alpha = first.gamma, kd_src.alpha
        self._teacher = (teacher.eval().requires_grad_(False),)
        self.terms = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        self.two_stage: dict[str, int] = {}
        if self.alpha > 0:
            self.terms["kd"] = REGISTRY["kd"](kd_src.temperature)
            self.weights["kd"] = self.alpha
        for m in methods:
            if m == "kd":
                continue
            cfg = getattr(params, m)
            self.terms[m] = REGISTRY[m](cfg, s_shapes, t_shapes)
            self.weights[m] = cfg.beta
            if getattr(cfg, "init_epochs", 0) > 0:
                self.two_stage[m] = cfg.init_epochs

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def init_epochs(self) -> int:
        return max(self.two_stage.values(), default=0)

    def forward(self, model, x, y, phase: str = "main"):
        with torch.inference_mode():
            t_logits, t_feats = self.teacher(x, features=True)
        t_logits, t_feats = t_logits.clone(), [f.clone() for f in t_feats]
        s_logits, s_feats = model(x, features=True)
        if phase == "init":  # stage 1 (RepDistiller's init()): the two-stage methods' own losses, unweighted
            weights = {n: 1.0 for n in self.two_stage}
            loss = 0.0
        else:
            weights = {n: w for n, w in self.weights.items() if n not in self.two_stage}
            loss = self.gamma * Fd.cross_entropy(s_logits, y)
        for n, w in weights.items():
            loss = loss + w * self.terms[n](s_logits, s_feats, t_logits, t_feats)
        return loss, s_logits
