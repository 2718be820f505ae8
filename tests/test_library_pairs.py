"""Every method on torchvision pairs at more than 32 px: ResNet-34 -> ResNet-18 and the cross-family
ResNet-50 -> MobileNetV3-Small, at 64 px, one step each: a finite loss, gradients on the student and the
method's parts, none on the teacher; a method that cannot pair the taps says so in one line (N/A)."""

import pytest
import torch

from kdpipe import config, models
from kdpipe.distill import Distiller, TrainData, feature_shapes

from .conftest import tiny_params

PAIRS = [("tv/resnet34", "tv/resnet18"), ("tv/resnet50", "tv/mobilenet_v3_small")]
SIZE, CLASSES = 64, 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # small convolutions on 2 cores: one thread avoids OpenMP contention with other jobs
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=PAIRS, ids=lambda p: "->".join(p))
def pair(request):
    torch.manual_seed(0)
    teacher, student = (models.create(n, CLASSES) for n in request.param)
    return teacher, student, feature_shapes(student, image_size=SIZE), feature_shapes(teacher, image_size=SIZE)


@pytest.mark.parametrize("method", config.METHODS)
def test_method_runs_one_step_or_says_na(pair, method):
    teacher, student, s_shapes, t_shapes = pair
    labels = torch.arange(40) % CLASSES
    p = config.validate(tiny_params(distill={"crd": {"nce_k": 16}}))
    try:
        obj = Distiller(teacher, [method], p.distill, s_shapes, t_shapes, TrainData(labels))
    except ValueError as e:  # the pipelines' N/A cell: one line naming the method and why
        assert method in str(e) and "\n" not in str(e)
        # FSP across widths (RepDistiller's N/A), KD-SVD across map widths, OFD without the teacher's BN-before-ReLU,
        # SDD without a model's final map and classifier (torchvision's ResNets have them, MobileNetV3 not)
        na = {"fsp": "channel counts", "kdsvd": "equal widths", "ofd": "margins", "sdd": "Features.final"}
        assert method in na and na[method] in str(e)
        return
    index = torch.arange(0, 40, 10)
    x = torch.randn(4, 3, SIZE, SIZE)
    x = (x, x.flip(3)) if obj.views else x  # MLKD: a second view
    for phase in ["init"] * (obj.init_epochs() > 0) + ["main"]:  # FT's paraphraser, FitNets' hints, ...: stage 1
        student.zero_grad(set_to_none=True)
        obj.zero_grad(set_to_none=True)
        loss, logits, _ = obj(student.train(), x, labels[index], phase, index=index)
        loss.backward()
        assert torch.isfinite(loss) and logits.shape == (4, CLASSES)
        assert all(q.grad is None for q in teacher.parameters())
        trainable = {id(q) for q in obj.trainable(student, phase)}
        parts = [q for q in obj.parameters() if id(q) in trainable]  # the method's own trained parts
        assert all(q.grad is not None for q in parts)
        if phase == "main" or obj.init_trains_student:
            assert sum(q.grad is not None for q in student.parameters()) > len(list(student.parameters())) // 2
