"""Helpers of the method tests: random logits, numpy float64 references (softmax, KL), and a Distiller between two
CIFAR models built from tiny params."""

import math

import numpy as np
import torch

from kdpipe import config, models
from kdpipe.distill import Distiller, TrainData, feature_shapes

from .conftest import tiny_params


def rand_logits(n=6, c=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, c, generator=g), scale * torch.randn(n, c, generator=g)


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p, q):
    """KL(p || q) of two distributions over the same support, 0 log 0 = 0."""
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def build(teacher_name, student_name, methods, classes=10, **distill):
    p = config.validate(tiny_params(distill=distill))
    torch.manual_seed(0)
    teacher, student = models.create(teacher_name, classes), models.create(student_name, classes)
    obj = Distiller(teacher, methods, p.distill, feature_shapes(student), feature_shapes(teacher),
                    TrainData(torch.arange(40) % classes))
    return obj, teacher.eval(), student.eval(), p
