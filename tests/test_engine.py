import json

import pytest
import torch
import torch.nn.functional as F

from kdpipe import augment, checkpoint, config, data, engine, models
from kdpipe.prepare import prepare

from .conftest import tiny_params


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(config.validate(tiny_params()).data, out)
    return data.load(out)


def make_run(tmp_path, name="s", **train_updates):
    cfg = config.validate(tiny_params(student=train_updates)).student
    torch.manual_seed(cfg.seed)
    model = models.create(cfg.model, 10)
    return engine.Run(name=name, model=model, cfg=cfg, out=tmp_path / f"{name}.pt", log=tmp_path / f"{name}.json",
                      meta={"role": "student"}, progress=False)


def test_augmentation_matches_per_image_reference(prepared):
    x = prepared.train.x[:16]
    got = augment.pad_crop_flip(x, torch.Generator().manual_seed(7))
    # Reference: the same random draws, applied one image at a time with explicit pad/slice/flip.
    g = torch.Generator().manual_seed(7)
    dy = torch.randint(0, 9, (16, 1), generator=g)[:, 0]
    dx = torch.randint(0, 9, (16, 1), generator=g)[:, 0]
    flip = torch.rand(16, generator=g) < 0.5
    for i in range(16):
        padded = F.pad(x[i], (4, 4, 4, 4))
        crop = padded[:, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        if flip[i]:
            crop = crop.flip(2)
        assert torch.equal(got[i], crop)
    assert flip.any() and (~flip).any() and (dy != 4).any()


def test_learning_rate_schedule():
    cfg = config.validate(tiny_params(student={"epochs": 8, "optim": {"lr": 0.1}})).student
    lrs = [engine.learning_rate(cfg, e, 0, 10) for e in range(8)]
    assert lrs == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    warm = config.validate(tiny_params(student={"epochs": 8, "schedule": {"warmup_epochs": 2}})).student
    assert engine.learning_rate(warm, 0, 0, 10) == pytest.approx(0.05 / 20)
    assert engine.learning_rate(warm, 1, 9, 10) == pytest.approx(0.05)
    assert engine.learning_rate(warm, 2, 0, 10) == pytest.approx(0.05)


def test_evaluate_counts_top1_top5(prepared):
    class Fixed(torch.nn.Module):  # logits that rank class (y + k) % 10 at position k for a known y
        def forward(self, x):
            return self.logits[: len(x)]

    y = torch.tensor([0, 1, 2, 3])
    m = Fixed()
    m.logits = torch.tensor([[9., 8, 7, 6, 5, 4, 3, 2, 1, 0]] * 4)  # ranks class 0 first, then 1, ...
    r = engine.evaluate(m, [(prepared.test.x[:3], y[:3]), (prepared.test.x[3:4], y[3:])])
    assert r["test_top1"] == 25.0 and r["test_top5"] == 100.0
    expected_loss = F.cross_entropy(m.logits, y).item()
    assert r["test_loss"] == pytest.approx(expected_loss)


def test_training_is_bit_identical_run_to_run(tmp_path, prepared):
    a = engine.train(make_run(tmp_path / "a"), prepared)
    b = engine.train(make_run(tmp_path / "b"), prepared)
    assert (tmp_path / "a/s.pt").read_bytes() == (tmp_path / "b/s.pt").read_bytes()
    assert a["history"] == b["history"]
    assert a["history"][-1]["epoch"] == 2 and "seconds" not in json.dumps(a["history"])
    c = engine.train(make_run(tmp_path / "c", seed=1), prepared)
    assert c["history"] != a["history"]


def test_resume_equals_uninterrupted(tmp_path, prepared):
    full = make_run(tmp_path / "full", epochs=3)
    engine.train(full, prepared)
    cut = make_run(tmp_path / "cut", epochs=3)
    cut.stop_after = 1
    with pytest.raises(KeyboardInterrupt):
        engine.train(cut, prepared)
    resume = tmp_path / "cut/s.pt.resume"
    assert resume.is_file() and not (tmp_path / "cut/s.pt").exists()
    assert torch.load(resume, weights_only=True)["epoch"] == 1
    engine.train(make_run(tmp_path / "cut", epochs=3), prepared)  # a fresh process would do exactly this
    assert (tmp_path / "cut/s.pt").read_bytes() == (tmp_path / "full/s.pt").read_bytes()
    assert not resume.exists()


def test_resume_state_of_other_params_is_ignored(tmp_path, prepared, capsys):
    cut = make_run(tmp_path, epochs=3)
    cut.stop_after = 1
    with pytest.raises(KeyboardInterrupt):
        engine.train(cut, prepared)
    result = engine.train(make_run(tmp_path, epochs=3, optim={"lr": 0.01}), prepared)
    assert "belongs to other params" in capsys.readouterr().err
    assert len(result["history"]) == 3


def test_nan_loss_aborts_without_checkpoint(tmp_path, prepared):
    run = make_run(tmp_path, optim={"lr": 1e12})
    with pytest.raises(engine.TrainingError, match="loss became (nan|inf)"):
        engine.train(run, prepared)
    assert not run.out.exists()


def test_checkpoint_of_other_architecture_is_rejected(tmp_path, prepared):
    engine.train(make_run(tmp_path), prepared)
    ckpt = checkpoint.load_checkpoint(tmp_path / "s.pt", "resnet8", 10)
    assert ckpt["model"] == "resnet8" and ckpt["params_m"] == 0.08
    with pytest.raises(checkpoint.CheckpointError, match="holds resnet8 with 10 classes, expected resnet20 with 10"):
        checkpoint.load_checkpoint(tmp_path / "s.pt", "resnet20", 10)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "junk.pt")
    model = checkpoint.restore_model(ckpt)
    assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in model.state_dict().items())


def test_compile_warmup_leaves_the_run_unchanged(tmp_path, prepared, monkeypatch):
    # torch.compile itself is slow to build on CPU; an identity stand-in checks the warm-up's bookkeeping:
    # the compiled run must end exactly where the plain run ends, and its warm-up is timed separately.
    monkeypatch.setattr(torch, "compile", lambda m, **options: m)
    plain = engine.train(make_run(tmp_path / "a"), prepared)
    compiled = engine.train(make_run(tmp_path / "b", runtime={"compile": True}), prepared)
    for k, v in plain["state_dict"].items():
        assert torch.equal(v, compiled["state_dict"][k]), k
    assert plain["history"] == compiled["history"]
    assert json.loads((tmp_path / "b/s.timing.json").read_text())["compile_seconds"] > 0


def test_an_init_stage_epoch_prints_no_test_columns(capsys):
    # the init stage does not test the student: its line says so by leaving the test columns out (no "nan%")
    from kdpipe.progress import Reporter

    log = Reporter("fsp", 3, 1, enabled=False)
    log.epoch({"epoch": 1, "phase": "init", "lr": 0.05, "train_loss": 1.5, "train_top1": 10.0}, 100.0)
    log.epoch({"epoch": 2, "phase": "main", "lr": 0.05, "train_loss": 1.2, "train_top1": 20.0, "test_top1": 30.0,
               "test_top5": 80.0}, 100.0)
    init, main = capsys.readouterr().err.splitlines()
    assert init == "fsp: epoch 1/3 [init] lr 0.05 loss 1.5000 train 10.00% 100 img/s"
    assert main == "fsp: epoch 2/3 [main] lr 0.05 loss 1.2000 train 20.00% test 30.00% top5 80.00% 100 img/s"



@pytest.mark.parametrize("no_decay", ["none", "norm_and_bias"])
def test_no_decay_spares_norm_weights_and_biases(no_decay):
    # one SGD step on zero gradients moves a parameter by -lr * wd * p alone: every parameter under `none`,
    # the 2-D ones alone under `norm_and_bias` (image_classification_sota's filter: 1-D parameters apart)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.zeros(1, 3, 5, 5))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    cfg = config.Train(optim=config.Optim(lr=0.5, momentum=0.0, weight_decay=0.1, no_decay=no_decay))
    opt = engine.make_optimizer(list(net.parameters()), cfg, torch.device("cpu"))
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in net.named_parameters():
        spared = no_decay == "norm_and_bias" and p.ndim == 1  # 0.bias, 1.weight, 1.bias, 3.bias
        expected = before[n] if spared else before[n] * (1 - 0.5 * 0.1)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=n)
    assert sum(p.ndim == 1 for p in net.parameters()) == 4


def test_dot_refuses_parameter_groups():
    from kdpipe.distill.dot import DOT

    cfg = config.Train(optim=config.Optim(no_decay="norm_and_bias"))
    with pytest.raises(config.ParamsError, match="dot: mdistiller's DOT has one parameter group"):
        DOT(config.Distill().dot).optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
