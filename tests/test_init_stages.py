"""AB and FT (RepDistiller's `abound` and `factor`): losses against explicit loops, the connectors and the
paraphraser/translator, what trains in each phase (the init-stage declarations), and bit-identical resume
inside and across the init stage."""

import pytest
import torch
import torch.nn.functional as F

from kdpipe import config, engine, models
from kdpipe.distill import Distiller, TrainData, feature_shapes
from kdpipe.distill import ab, ft as factor_transfer

from .conftest import distill_runs, tiny_params

LABELS = torch.arange(96) % 10


def build(methods, teacher="resnet14", student="resnet8", num_classes=10, **distill):
    p = config.validate(tiny_params(distill=distill))
    torch.manual_seed(0)
    t, s = models.create(teacher, num_classes), models.create(student, num_classes)
    obj = Distiller(t, methods, p.distill, feature_shapes(s), feature_shapes(t), TrainData(LABELS))
    return obj, t, s


def test_ab_loss_against_an_elementwise_loop():
    g = torch.Generator().manual_seed(0)
    gs = [torch.randn(2, 3, 2, 2, generator=g) * 2 for _ in range(3)]
    gt = [torch.randn(2, 3, 2, 2, generator=g) for _ in range(3)]
    margin, expected = 1.0, 0.0
    for i, (s, t) in enumerate(zip(gs, gt)):
        layer = 0.0
        for sv, tv in zip(s.flatten().tolist(), t.flatten().tolist()):
            if tv <= 0 and sv > -margin:  # the teacher's neuron is off: push the student below -margin
                layer += (sv + margin) ** 2
            if tv > 0 and sv <= margin:  # on: push above +margin
                layer += (sv - margin) ** 2
        expected += 2 ** (i - 2) * layer / 2 * 3 / 1000  # weights 1/4, 1/2, 1; / batch; x 3/1000
    assert ab.ab(gs, gt, margin).item() == pytest.approx(expected, rel=1e-6)
    # hand value: one element, teacher on, student 0.5 inside the margin: (0.5 - 1)^2 * 3 / 1000
    assert ab.ab([torch.tensor([[[[0.5]]]])], [torch.tensor([[[[2.0]]]])]).item() == pytest.approx(0.25 * 3e-3)
    assert ab.ab([torch.tensor([[[[1.5]]]])], [torch.tensor([[[[2.0]]]])]).item() == 0.0  # beyond the margin


def test_ft_loss_against_an_explicit_formula():
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    pooled = fs.reshape(2, 4, 4, 2, 4, 2).mean((3, 5))  # the larger map averaged to 4x4

    def factor(f):
        v = (f ** 2).mean(1).reshape(2, -1)
        return v / v.norm(dim=1, keepdim=True)

    expected = (factor(pooled) - factor(ft)).abs().mean()
    torch.testing.assert_close(factor_transfer.ft(fs, ft), expected)
    torch.testing.assert_close(factor_transfer.ft(fs, ft, p2=2), (factor(pooled) - factor(ft)).pow(2).mean())


def test_ab_connectors_as_repdistiller():
    obj, _, _ = build(["ab"])  # resnet14 -> resnet8: equal shapes, identity connectors
    assert all(isinstance(c, torch.nn.Identity) for c in obj.terms["ab"].connectors)
    obj, _, _ = build(["ab"], teacher="wrn_40_2", student="shufflev1", num_classes=100)
    convs = [c[0] for c in obj.terms["ab"].connectors]
    # ShuffleNetV1 16x16 -> WRN 32x32: transposed conv; then 8x8 -> 16x16, 4x4 -> 8x8; conv + BN, no ReLU
    assert [type(c).__name__ for c in convs] == ["ConvTranspose2d"] * 3
    assert all(len(c) == 2 for c in obj.terms["ab"].connectors)


def phase_step(obj, student, phase, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 3, 32, 32, generator=g), LABELS[:8]
    opt = torch.optim.SGD(obj.trainable(student, phase), lr=0.1, momentum=0.9)
    loss, _, _ = obj(student.train(), x, y, phase)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss, x, y


def test_ab_phases():
    obj, teacher, student = build(["ab"], teacher="wrn_16_2", student="wrn_16_1", ab={"init_epochs": 2})
    assert obj.init_epochs() == 2
    term = obj.terms["ab"]
    connector_params = set(map(id, term.parameters()))
    assert connector_params  # 16 -> 32 channels: conv connectors
    init = set(map(id, obj.trainable(student, "init")))
    main = set(map(id, obj.trainable(student, "main")))
    assert connector_params <= init and not connector_params & main  # connectors: init stage only
    assert set(map(id, student.parameters())) <= init and set(map(id, student.parameters())) == main
    # the init loss is AB on the pre-ReLU taps, unweighted
    x, y = torch.randn(4, 3, 32, 32), LABELS[:4]
    student.eval()
    loss, _, _ = obj(student, x, y, "init")
    with torch.no_grad():
        t = teacher(x, features=True)
    s = student(x, features=True)
    expected = ab.ab([c(f) for c, f in zip(term.connectors, s.preact[1:])], t.preact[1:])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # after it the student trains with CE alone, as RepDistiller (loss_kd = 0)
    loss, logits, _ = obj(student, x, y, "main")
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    # one init step trains the student's layers and the connectors, never the teacher
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    conn_before = [p.clone() for p in term.parameters()]
    phase_step(obj, student, "init")
    assert all(not torch.equal(p, q) for p, q in zip(term.parameters(), conn_before))
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def test_ft_phases_train_the_paraphraser_then_the_student_and_translator():
    obj, teacher, student = build(["ft"], ft={"init_epochs": 1})
    term = obj.terms["ft"]
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert set(map(id, obj.trainable(student, "init"))) == set(map(id, term.paraphraser.parameters()))
    assert set(map(id, obj.trainable(student, "main"))) == \
        set(map(id, student.parameters())) | set(map(id, term.translator.parameters()))
    # init stage: MSE reconstruction of the teacher's last stage; the student is not touched (weights, BN)
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    para_before = {k: v.clone() for k, v in term.paraphraser.state_dict().items()}
    # the reconstruction error written out, before the optimiser step (RepDistiller: MSELoss(f_t_rec, f_t), weight 1)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # phase_step's batch
    with torch.no_grad():
        f_t = teacher(x, features=True).stages[-1]
        rec = term.paraphraser.decoder(term.paraphraser.encoder(f_t))
    assert rec.shape == f_t.shape
    expected = ((rec.double() - f_t.double()) ** 2).sum() / f_t.numel()
    loss, x_seen, _ = phase_step(obj, student, "init")
    assert torch.equal(x_seen, x)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # fp32 mean against float64: rounding only
    assert all(torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert any(not torch.equal(v, para_before[k]) for k, v in term.paraphraser.state_dict().items())
    # main phase: CE + beta * FT; the paraphraser is frozen, the translator and the student train
    para_before = {k: v.clone() for k, v in term.paraphraser.state_dict().items()}
    trans_before = {k: v.clone() for k, v in term.translator.state_dict().items()}
    student.eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, 32, 32, generator=g), LABELS[:4]
    loss, logits, _ = obj(student, x, y, "main")
    with torch.no_grad():
        code = term.paraphraser.encoder(teacher(x, features=True).stages[-1])
    s = student(x, features=True)
    term.translator.eval()
    expected = F.cross_entropy(logits, y) + 200 * factor_transfer.ft(term.translator(s.stages[-1]), code)
    term.translator.train()
    obj.eval()
    loss, logits, _ = obj(student, x, y, "main")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    obj.train()
    phase_step(obj, student, "main", seed=4)
    assert all(torch.equal(v, para_before[k]) for k, v in term.paraphraser.state_dict().items())
    assert any(not torch.equal(v, trans_before[k]) for k, v in term.translator.state_dict().items())
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def test_defaults_are_repdistillers():
    d = config.Distill()  # scripts/run_cifar_distill.sh: abound -a 0 -b 1; factor -a 0 -b 200; init_epochs 30
    assert (d.ab.gamma, d.ab.alpha, d.ab.beta, d.ab.margin, d.ab.init_epochs) == (1, 0, 1, 1, 30)
    assert (d.ft.gamma, d.ft.alpha, d.ft.beta, d.ft.rate, d.ft.p1, d.ft.p2, d.ft.init_epochs) == (1, 0, 200, 0.5, 2, 1, 30)


def test_ft_needs_its_paraphraser_stage():
    with pytest.raises(config.ParamsError, match="distill.ft.init_epochs: Input should be greater than or equal to 1"):
        config.validate(tiny_params(distill={"ft": {"init_epochs": 0}}))


@pytest.mark.parametrize("methods, stop", [(["ab"], 1), (["ab"], 2), (["ft"], 1), (["ft"], 2), (["ft", "kd"], 2)])
def test_resume_inside_and_across_the_init_stage_is_bit_identical(tmp_path, methods, stop):
    # init_epochs 2, epochs 2: stopping after epoch 1 is inside the init stage, after 2 at its boundary
    p = config.validate(tiny_params(distill={"ab": {"init_epochs": 2}, "ft": {"init_epochs": 2}}))
    prepared, run = distill_runs(tmp_path, p, methods)
    full = engine.train(run(tmp_path / "full.pt"), prepared)
    assert [r["phase"] for r in full["history"]] == ["init", "init", "main", "main"]
    assert not any(k.startswith(("terms", "paraphraser", "translator", "connectors")) for k in full["state_dict"])
    out = tmp_path / "cut.pt"
    with pytest.raises(KeyboardInterrupt):
        engine.train(run(out, stop), prepared)
    engine.train(run(out), prepared)
    assert out.read_bytes() == (tmp_path / "full.pt").read_bytes()
