"""The distillation objective: frozen teacher, gradients, weights of combined terms, two-stage training."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from kdpipe import config, engine, models
from kdpipe.cli import app
from kdpipe.distill import Distiller, feature_shapes
from kdpipe.distill import functional as Fd
from kdpipe.distill import at, nst
from kdpipe.distill.base import regressor
from kdpipe.distill.fsp import check_channels

from .conftest import distill_runs, tiny_params, write_params


def build(methods, **distill_updates):
    p = config.validate(tiny_params(distill=distill_updates))
    torch.manual_seed(0)
    teacher, student = models.create("resnet14", 10), models.create("resnet8", 10)
    obj = Distiller(teacher, methods, p.distill, feature_shapes(student), feature_shapes(teacher))
    return obj, teacher, student


def test_teacher_frozen_and_gradients_reach_only_student_and_regressor():
    obj, teacher, student = build(["fitnets", "kd", "at"])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    params = list(student.parameters()) + list(obj.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    student.train()
    obj.train()  # must not put the teacher in training mode
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        loss, _, _ = obj(student, x, y)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in student.parameters())
        assert all(p.grad is not None for p in obj.terms["fitnets"].regressor.parameters())
        opt.step()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # weights and BN running stats untouched
        assert torch.equal(v, before[k]), k
    # the teacher is not part of the objective's parameters or checkpoint
    assert not any(k.startswith("teacher") or "_teacher" in k for k in obj.state_dict())
    assert set(obj.state_dict()) == {f"terms.fitnets.regressor.{k}" for k in obj.terms["fitnets"].regressor.state_dict()}


def test_loss_is_the_documented_weighted_sum():
    obj, teacher, student = build(["kd", "at", "nst"], at={"beta": 10.0}, nst={"beta": 3.0})
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss, logits, terms = obj(student, x, y)
    teacher.eval()
    with torch.no_grad():
        tl, tf = teacher(x, features=True)
    sl, sf = student(x, features=True)
    kl = (F.softmax(tl / 4, 1) * (F.log_softmax(tl / 4, 1) - F.log_softmax(sl / 4, 1))).sum(1).mean() * 16
    expected = {"ce": 0.1 * F.cross_entropy(sl, y), "kd": 0.9 * kl,
                "at": 10.0 * sum(at.attention(sf[i], tf[i]) for i in (1, 2, 3)),
                "nst": 3.0 * sum(nst.nst(sf[i], tf[i]) for i in (1, 2, 3))}
    assert list(terms) == list(expected)  # the loss's named parts, in the order they are summed
    for k, v in expected.items():
        assert terms[k].item() == pytest.approx(v.item(), rel=1e-5), k
    assert loss.item() == pytest.approx(sum(v.item() for v in expected.values()), rel=1e-5)
    torch.testing.assert_close(logits, sl)


def test_each_epoch_records_the_loss_terms(tmp_path, workdir):
    """The run's history, log, plots/NAME.csv and report have each term per epoch; they add up to the loss."""
    import csv
    import json

    from kdpipe import data, evaluate, report

    p = config.validate(tiny_params(student={"epochs": 2}, distill={"dkd": {"warmup_epochs": 2}}))
    prepared, make = distill_runs(tmp_path, p, ["kd", "dkd"])
    run = make(workdir / "models/kd+dkd.pt")
    run.log, run.meta = workdir / "logs/kd+dkd.json", {"role": "distill", "method": "kd+dkd"}
    history = engine.train(run, prepared)["history"]
    for row in history:
        assert row["train_loss"] == pytest.approx(row["loss_ce"] + row["loss_kd"] + row["loss_dkd"], rel=1e-5)
    log = json.loads(run.log.read_text())
    assert log["loss_terms"] == [{"epoch": r["epoch"], "phase": "main", "ce": r["loss_ce"], "kd": r["loss_kd"],
                                  "dkd": r["loss_dkd"]} for r in history]
    evaluate.run("kd+dkd", run.out, tmp_path / "prepared", workdir / "metrics/kd+dkd.json",
                 workdir / "plots/kd+dkd.csv", p.evaluate)
    rows = list(csv.DictReader((workdir / "plots/kd+dkd.csv").open()))
    assert [float(r["loss_dkd"]) for r in rows] == pytest.approx([h["loss_dkd"] for h in history], rel=1e-5)
    text = report.write(["kd+dkd"], data.read_manifest(tmp_path / "prepared"), workdir / "metrics", workdir / "logs",
                        workdir / "plots", workdir / "reports")
    last = history[-1]
    total = last["loss_ce"] + last["loss_kd"] + last["loss_dkd"]
    assert (f"| kd+dkd | {total:.4f} = ce {last['loss_ce']:.4f} + kd {last['loss_kd']:.4f} + "
            f"dkd {last['loss_dkd']:.4f} |") in text


def test_combination_rules():
    from kdpipe.distill import KDTerm, get

    obj, _, _ = build(["kd", "at"])
    assert (obj.gamma, obj.weights) == (0.1, {"kd": 0.9, "at": 1000.0})
    assert type(obj.terms["kd"]) is get("kd")  # KD is a registered term like the others, weighed by its alpha
    obj, _, _ = build(["at"])
    assert (obj.gamma, obj.weights) == (1.0, {"at": 1000.0})  # no KD term at alpha = 0
    obj, _, _ = build(["at", "kd"], kd={"temperature": 8.0})
    assert (obj.gamma, list(obj.weights), obj.weights["kd"], obj.terms["kd"].cfg.temperature) == (1.0, ["kd", "at"], 0.9, 8.0)
    obj, _, _ = build(["nst"], nst={"alpha": 0.5, "temperature": 2.0})
    assert type(obj.terms["kd"]) is KDTerm  # brought by nst's alpha, with nst's temperature
    assert obj.weights == {"kd": 0.5, "nst": 50.0} and obj.terms["kd"].cfg.temperature == 2.0


def test_terms_declare_their_weight_exclusivity_and_optimiser():
    # what the objective and the engine need is declared on each term: no method name in the engine's code
    from kdpipe.distill import get

    assert {m: get(m).weight_param for m in config.METHODS if get(m).weight_param != "beta"} == \
        {"kd": "alpha", "dkd": None, "mlkd": None, "sdd": None, "wkd": None, "rld": None}
    assert [m for m in config.METHODS if get(m).runs_alone] == ["ofd"]
    assert [m for m in config.METHODS if get(m).optimizer is not None] == ["dot"]
    src = Path(engine.__file__).read_text()
    assert not [m for m in config.METHODS if re.search(rf"[\"']{m}[\"']|\b{get(m).label}\b", src)]
    with pytest.raises(ValueError, match=r"ofd\+kd: ofd runs the teacher's BN on batch statistics .*; run it alone"):
        build(["ofd", "kd"])


def test_default_hyper_parameters():
    d = config.Distill()
    assert (d.kd.temperature, d.kd.gamma, d.kd.alpha) == (4.0, 0.1, 0.9)
    assert [getattr(d, m).beta for m in ("at", "nst", "fsp", "fitnets")] == [1000, 50, 1, 100]
    assert all((getattr(d, m).gamma, getattr(d, m).alpha) == (1.0, 0.0) for m in ("at", "nst", "fsp", "fitnets"))
    # RepDistiller's procedures: FSP as 30 epochs of pre-training then CE; FitNets with a 1x1 ConvReg
    assert (d.fsp.init_epochs, d.fitnets.regressor_kernel, d.fitnets.init_epochs) == (30, 1, 0)


def test_two_stage_phases():
    obj, teacher, student = build(["fitnets"], fitnets={"init_epochs": 2, "alpha": 0.9})
    assert obj.init_epochs() == 2
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss, _, _ = obj(student, x, y, "init")
    with torch.no_grad():
        tf = teacher(x, features=True)[1]
    sf = student(x, features=True)[1]
    # stage 1 is RepDistiller's init(): the method's own loss, unweighted (beta applies in single-stage mode)
    expected = Fd.hint(obj.terms["fitnets"].regressor(sf[2]), tf[2])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()  # stage 1 trains the student only up to the hint layer, plus the regressor
    assert student.stage3[0].conv1.weight.grad is None and student.fc.weight.grad is None
    assert student.stage2[0].conv1.weight.grad is not None
    student.zero_grad()
    loss, logits, _ = obj(student, x, y, "main")  # stage 2: gamma * CE + alpha * KD, no hint term
    with torch.no_grad():
        tl = teacher(x)
    assert loss.item() == pytest.approx((F.cross_entropy(logits, y) + 0.9 * Fd.kd(logits, tl, 4.0)).item(), rel=1e-5)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_regressor_is_repdistillers_convreg():
    # equal sizes: 1x1 conv with bias + BN + ReLU; 32 -> 32 channels = 32*32 + 32 + 2*32 = 1,120 parameters
    r = regressor((32, 16, 16), (32, 16, 16))
    assert r[0].kernel_size == (1, 1) and r[0].bias is not None and n_params(r) == 1120
    assert n_params(regressor((32, 16, 16), (32, 16, 16), kernel=3)) == 32 * 32 * 9 + 32 + 64  # the 3x3 variant
    r = regressor((16, 32, 32), (32, 16, 16))  # student map twice as large: 3x3 stride 2
    assert r[0].kernel_size == (3, 3) and r[0].stride == (2, 2)
    assert r(torch.randn(2, 16, 32, 32)).shape == (2, 32, 16, 16)
    r = regressor((64, 8, 8), (32, 16, 16))  # half as large: 4x4 transposed conv, stride 2
    assert isinstance(r[0], torch.nn.ConvTranspose2d) and r(torch.randn(2, 64, 8, 8)).shape == (2, 32, 16, 16)
    r = regressor((16, 10, 10), (8, 8, 8))  # otherwise: a (1 + Hs - Ht) kernel
    assert r[0].kernel_size == (3, 3) and r(torch.randn(2, 16, 10, 10)).shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match="no regressor from a 4x4 student hint to a 16x16"):
        regressor((64, 4, 4), (32, 16, 16))


def test_fsp_rejects_mismatched_channels():
    shapes = {n: feature_shapes(models.create(n, 100)) for n in ("resnet32x4", "resnet8x4", "shufflev1", "vgg8")}
    check_channels(shapes["resnet8x4"], shapes["resnet32x4"])  # same widths per tap: fine
    with pytest.raises(ValueError, match="fsp needs equal channel counts per tap .*f0: student 24 vs teacher 32; "
                                         "f1: student 240 vs teacher 64"):
        check_channels(shapes["shufflev1"], shapes["resnet32x4"])
    with pytest.raises(ValueError, match="fsp pairs stages one to one, but the student has 5 feature taps and the teacher 4"):
        check_channels(shapes["vgg8"], shapes["resnet32x4"])


def test_bad_method_and_params_fail_at_validation(workdir):
    result = CliRunner().invoke(app, ["distill", "--method", "kd+foo"])
    assert result.exit_code == 2 and "unknown method 'foo'; valid: kd, at, nst, fsp, fitnets" in result.output
    assert CliRunner().invoke(app, ["distill", "--method", "kd+kd"]).exit_code == 2
    write_params(workdir / "params.yaml", tiny_params(distill={"fitnets": {"hint_layer": 5}, "at": {"betta": 1}}))
    result = CliRunner().invoke(app, ["distill", "--method", "fitnets"])
    assert result.exit_code == 2
    assert "distill.fitnets.hint_layer: Input should be less than or equal to 4 (got 5)" in result.output
    assert "distill.at.betta: unknown key (did you mean 'beta'?)" in result.output
    assert not (workdir / "models").exists()


def test_distill_needs_a_teacher_for_the_same_data(workdir):
    assert CliRunner().invoke(app, ["data"]).exit_code == 0
    result = CliRunner().invoke(app, ["distill", "-m", "kd"])
    assert result.exit_code == 1 and "models/teacher.pt: checkpoint not found" in result.output


def test_two_stage_distillation_resumes_across_the_stage_boundary(tmp_path):
    p = config.validate(tiny_params(student={"epochs": 2}, distill={"fitnets": {"init_epochs": 2}}))
    prepared, run = distill_runs(tmp_path, p, ["fitnets"])
    full = engine.train(run(tmp_path / "full.pt"), prepared)
    assert [r["phase"] for r in full["history"]] == ["init", "init", "main", "main"]
    for stop in (1, 2, 3):  # inside stage 1, at the boundary, inside stage 2
        out = tmp_path / f"cut{stop}.pt"
        with pytest.raises(KeyboardInterrupt):
            engine.train(run(out, stop), prepared)
        engine.train(run(out), prepared)
        assert out.read_bytes() == (tmp_path / "full.pt").read_bytes(), stop
    # the exported student is the student alone: no regressor weights
    assert not any("regressor" in k for k in full["state_dict"])
