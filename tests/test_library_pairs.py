"""Every method on torchvision pairs at more than 32 px: ResNet-34 -> ResNet-18 and the cross-family
ResNet-50 -> MobileNetV3-Small, at 64 px, one step each: a finite loss, gradients on the student and the
method's parts, none on the teacher; exactly the methods listed as N/A for a pair say in one line that they
cannot pair its taps, and every other method runs."""

import pytest
import torch

from kdpipe import config, models
from kdpipe.distill import Distiller, TrainData, feature_shapes

from .conftest import tiny_params

PAIRS = [("tv/resnet34", "tv/resnet18"), ("tv/resnet50", "tv/mobilenet_v3_small")]
# per pair, exactly the methods that cannot pair its taps (the pipelines' N/A cells), each with a phrase of its
# one-line reason; every other method must run (a method that ran and stops running, or starts to, fails here)
NOT_APPLICABLE = {
    ("tv/resnet34", "tv/resnet18"): {},  # same family, same widths: every method runs (FSP, KD-SVD, OFD, SDD too)
    ("tv/resnet50", "tv/mobilenet_v3_small"): {
        "fsp": "equal channel counts",  # FSP across widths (RepDistiller's N/A)
        "sdd": "Features.final",  # SDD needs the student's final map and classifier (torchvision's ResNets have them)
    },
}
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
    return (request.param, teacher, student, feature_shapes(student, image_size=SIZE),
            feature_shapes(teacher, image_size=SIZE))


def test_not_applicable_lists_name_the_pairs_and_real_methods():
    assert list(NOT_APPLICABLE) == PAIRS and all(set(na) <= set(config.METHODS) for na in NOT_APPLICABLE.values())


@pytest.mark.parametrize("method", config.METHODS)
def test_method_runs_one_step_or_says_na(pair, method):
    names, teacher, student, s_shapes, t_shapes = pair
    labels = torch.arange(40) % CLASSES
    p = config.validate(tiny_params(distill={"crd": {"nce_k": 16}}))
    na = NOT_APPLICABLE[names]
    if method in na:  # the pipelines' N/A cell: one line naming the method and why
        with pytest.raises(ValueError) as e:
            Distiller(teacher, [method], p.distill, s_shapes, t_shapes, TrainData(labels))
        assert method in str(e.value) and "\n" not in str(e.value) and na[method] in str(e.value)
        return
    obj = Distiller(teacher, [method], p.distill, s_shapes, t_shapes, TrainData(labels))  # runs: no ValueError
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
