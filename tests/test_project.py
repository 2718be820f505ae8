"""`kdpipe init` (a project of one's own) and kdpipe-code.yaml (its stages' dependency on the installed kdpipe)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdpipe import config, project

from .conftest import DVC, ROOT, sh

KDPIPE = str(Path(sys.executable).with_name("kdpipe"))
# examples/compress is `kdpipe init`'s output for these arguments (`make examples` writes it)
EXAMPLE = dict(data="../../../shared/data/cifar10-jpeg-mini", teacher="tv/resnet50", student="tv/resnet18",
               image_size=224, methods=["kd", "dkd"])


def kdpipe(*args, cwd, env=None):
    return subprocess.run([KDPIPE, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})})


def installed_copy(tmp_path: Path) -> dict:
    """A copy of the package standing in for a pip-installed kdpipe (edited by the tests, never the source): the
    env whose PYTHONPATH makes `kdpipe` import it."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "kdpipe", site / "kdpipe", ignore=shutil.ignore_patterns("__pycache__"))
    return {"PYTHONPATH": str(site)}


def test_init_writes_a_project_whose_params_validate(tmp_path):
    r = kdpipe("init", "proj", "--methods", "kd,dist", "--epochs", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    proj = tmp_path / "proj"
    assert (proj / ".git").is_dir() and (proj / ".dvc").is_dir()
    p = config.load_params(proj / "params.yaml")
    assert p.data.dataset == "synthetic" and p.teacher.epochs == p.student.epochs == 5
    assert p.teacher.model == "tv/resnet50" and p.teacher.weights == "DEFAULT"
    assert p.teacher.runtime.workers == p.student.runtime.workers == p.evaluate.workers == "auto"  # not 8 on 2 cores
    stages = sh(DVC, "stage", "list", "--names-only", cwd=proj).split()
    assert stages == ["data", "teacher", "student", "distill@kd", "distill@dist",
                      *(f"evaluate@{n}" for n in ("teacher", "student", "kd", "dist")),
                      *(f"export@{n}" for n in ("teacher", "student", "kd", "dist")),
                      *(f"quantize@{n}" for n in ("student", "kd", "dist")), "measure", "report"]
    # every key spelled out: a changed default in kdpipe never changes a project's results silently
    from .test_full_pipelines import unspelled

    raw = yaml.safe_load((proj / "params.yaml").read_text())
    grid = {"recipes", "table", "table_models", "models", "published", "seeds", "launch", "methods", "pairs",
            "variants", "group_students", "wkd_teachers"}
    assert unspelled(raw, config.Params, skip=frozenset(grid | {f"distill.{m}" for m in config.METHODS
                                                                if m not in ("kd", "dist")})) == []
    # metrics and curves are committed (dvc exp show and metrics diff read them from git revisions)
    ignored = subprocess.run(["git", "check-ignore", "metrics/kd.json", "plots/kd.csv"], cwd=proj).returncode
    assert ignored == 1


def test_init_qat_adds_a_qat_stage_per_named_student(tmp_path):
    """`--qat dist,student`: qat@dist and qat@student, their files measured and reported, and `distill.kd` (QAT's
    loss) spelled out although KD is not among the methods."""
    r = kdpipe("init", "proj", "--methods", "dist", "--qat", "dist,student", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    proj = tmp_path / "proj"
    stages = sh(DVC, "stage", "list", "--names-only", cwd=proj).split()
    assert [s for s in stages if s.startswith("qat@")] == ["qat@dist", "qat@student"]
    assert stages.index("qat@student") < stages.index("measure")
    dvc = yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]
    assert dvc["measure"]["cmd"].endswith("student.int8 dist.int8 dist.qat student.qat")
    assert {"metrics/dist.qat.json", "metrics/student.qat.json"} <= set(dvc["report"]["deps"])
    p = yaml.safe_load((proj / "params.yaml").read_text())
    assert set(p["distill"]) == {"dist", "kd"} and p["qat"] == config.Qat().model_dump()


def test_init_scales_the_methods_epoch_counts():
    # DKD warms up for 20 of CIFAR's 240 epochs: 1 of 10; FSP's init stage 30 of 240: 4 of 30
    text = project.params_text(None, "resnet56", "resnet20", 32, ["dkd", "fsp"], epochs=30)
    raw = yaml.safe_load(text)
    assert raw["distill"]["dkd"]["warmup_epochs"] == round(20 * 30 / 240) == 2
    assert raw["distill"]["fsp"]["init_epochs"] == round(30 * 30 / 240) == 4
    assert yaml.safe_load(project.params_text(None, "resnet56", "resnet20", 32, ["dkd"], epochs=10))[
        "distill"]["dkd"]["warmup_epochs"] == 1


@pytest.mark.parametrize("path", ["params.yaml", "examples/compress/params.yaml"])
def test_no_epoch_count_exceeds_the_run(path):
    """Every key counted in epochs (warm-ups, init stages, decays: `config.epoch_keys`) fits the run it is for: the
    quickstart's 8-epoch students never stay in a 240-epoch warm-up."""
    p = config.load_params(ROOT / path)
    for m in config.METHODS:
        if m in yaml.safe_load((ROOT / path).read_text())["distill"]:
            cfg, epochs = getattr(p.distill, m), p.student_for([m]).epochs
            keys = config.epoch_keys(type(cfg))
            assert all(getattr(cfg, k) <= epochs for k in keys), (m, {k: getattr(cfg, k) for k in keys}, epochs)
    assert {m: config.epoch_keys(type(getattr(p.distill, m))) for m in ("sdd", "wkd", "ctkd", "ft")} == {
        "sdd": ["warmup_epochs"], "wkd": ["decay_start", "decay_end"], "ctkd": ["decay_loops"], "ft": ["init_epochs"]}


@pytest.mark.parametrize("epochs, decay", [(2, (1, 2)), (10, (6, 10)), (480, (300, 480))])
def test_init_scales_every_methods_epoch_counts(epochs, decay):
    raw = yaml.safe_load(project.params_text(None, "resnet56", "resnet20", 32, list(config.METHODS), epochs=epochs))
    p = config.validate(raw)
    for m in config.METHODS:
        cfg = getattr(p.distill, m)
        assert all(getattr(cfg, k) <= epochs for k in config.epoch_keys(type(cfg))), m
    assert (p.distill.wkd.decay_start, p.distill.wkd.decay_end) == decay
    # one epoch cannot hold WKD's decay (it starts after its first epoch and ends at its last): one line
    with pytest.raises(project.ProjectError, match="--epochs 1: wkd's epoch counts do not scale to it"):
        project.params_text(None, "resnet56", "resnet20", 32, ["wkd"], epochs=1)


@pytest.mark.parametrize("args, message", [
    (["--methods", "kd,dkdd"], "dkdd"),
    (["--student", "tv/mobilenet_v9"], "mobilenet_v9"),
    (["--data", "no/such/folder"], "no/such/folder"),
    (["--methods", "kd,kd"], "once"),
    (["--methods", "kd+at"], "a project's rows are single methods (comma-separated: kd,at)"),
    (["--methods", "dkd", "--qat", "kd"], "--qat: 'kd': name each student once, among: student, dkd"),
    (["--data", "photos_with_val"], "photos_with_val/test: [Errno 2] No such file or directory: "),
    (["--data", "photos_with_val"], "found val/: rename it to test/"),
])
def test_init_refuses_bad_input_and_writes_nothing(tmp_path, args, message):
    for split in ("train", "val"):  # a layout with val/ instead of test/
        (tmp_path / "photos_with_val" / split / "cat").mkdir(parents=True)
        (tmp_path / "photos_with_val" / split / "cat" / "a.jpg").write_bytes(b"")
    r = kdpipe("init", "proj", *args, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "proj").exists()


def test_init_does_not_overwrite_a_project(tmp_path):
    assert kdpipe("init", "proj", cwd=tmp_path).returncode == 0
    (tmp_path / "proj" / "params.yaml").write_text("# mine\n")
    r = kdpipe("init", "proj", cwd=tmp_path)
    assert r.returncode == 1 and "--force" in r.stderr
    assert (tmp_path / "proj" / "params.yaml").read_text() == "# mine\n"


def record_of(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", "import json; from kdpipe import project; "
                          "print(json.dumps(project.code_record()))"], env={**os.environ, **env}, cwd=env["PYTHONPATH"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def flat(record: dict) -> dict:
    return {(f"{k}.{m}" if isinstance(v, dict) else k): h for k, v in record.items() if k != "version"
            for m, h in (v.items() if isinstance(v, dict) else [(None, v)])}


TRAINED = {"train", "evaluate", "wkd-cost"} | {f"distill.{m}" for m in config.METHODS}


@pytest.mark.parametrize("edited, changed", [
    ("distill/dkd.py", {"distill.dkd"}),
    ("report.py", {"report"}),
    ("quantize.py", {"quantize", "qat", "measure"}),  # measure runs the files through quantize.py's session
    ("prepare.py", {"data"}),
    # the training loop decides every trained and evaluated result (QAT's fine-tuning too), never the data, export
    # or report
    ("engine.py", TRAINED | {"qat"}),
    # the deployment schema: every stage imports it to validate the params file, those three alone depend on it
    ("config/deploy.py", {"quantize", "qat", "measure"}),
])
def test_an_edit_of_the_installed_package_changes_its_stages_keys_alone(tmp_path, edited, changed):
    env = installed_copy(tmp_path)
    before = flat(record_of(env))
    path = tmp_path / "site" / "kdpipe" / edited
    if edited == "engine.py":  # one file shows what never counts: a comment, a docstring
        path.write_text(path.read_text().replace('"""', '""" A docstring changes nothing.', 1)
                        + "\n# a comment changes nothing\n")
        assert flat(record_of(env)) == before
    path.write_text(path.read_text() + "\nEDITED = 1  # code does\n")
    after = flat(record_of(env))
    assert {k for k in before if before[k] != after[k]} == changed
    assert flat(record_of(env)) == after  # deterministic


@pytest.mark.parametrize("package, changed", [
    ("onnxruntime", {"quantize", "qat", "measure"}),
    ("torch", {"data", "export", "quantize", "qat", "measure"} | TRAINED),
    ("matplotlib", {"report"}),
])
def test_an_upgrade_of_a_package_changes_the_keys_it_decides(monkeypatch, package, changed):
    from importlib import metadata

    before = flat(project.code_record())
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "99.0" if name == package else real(name))
    after = flat(project.code_record())
    assert {k for k in before if before[k] != after[k]} == changed


def test_the_config_files_are_all_named():
    # a new config file is in every stage's code (project.CONFIG) or says which stages it decides
    files = {f"config/{f.name}" for f in (project.package_root() / "config").glob("*.py")}
    assert files == set(project.CONFIG) | {project.DEPLOY_SCHEMA}


def test_validation_only_is_what_validating_the_params_imports():
    # every stage validates the whole params file: what that imports beyond the config and model files every stage
    # depends on is VALIDATION_ONLY (the deploy schema, every method's file and what they share), no more, no less
    import subprocess
    import sys

    code = ("import os, sys, kdpipe, kdpipe.config\nroot = os.path.dirname(kdpipe.__file__)\n"
            "print('\\n'.join(os.path.relpath(m.__file__, root) for m in list(sys.modules.values())"
            " if (getattr(m, '__name__', None) or '').startswith('kdpipe.') and getattr(m, '__file__', None)))")
    imported = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
    common = set(project.code_files("data"))  # the config and model files (and the data stage's own two)
    assert imported - common == project.VALIDATION_ONLY


def test_examples_compress_is_what_init_writes():
    # one template: the example is `kdpipe init`'s output (`make examples` rewrites it after a template or code change)
    files = project.project_files(**EXAMPLE)
    stale = [name for name, text in files.items() if (ROOT / "examples/compress" / name).read_text() != text]
    assert not stale, f"examples/compress differs from `kdpipe init`'s output in {stale}: run `make examples`"


@pytest.mark.slow
def test_a_package_change_reruns_its_stage_alone(tmp_path):
    # kdpipe installed (a copy on PYTHONPATH), a project trained on tiny synthetic data; then the installed DKD loss
    # changes: its stage refuses to run until `kdpipe sync`, after which DVC finds distill@dkd stale, nothing else
    env = installed_copy(tmp_path)
    assert kdpipe("init", "proj", "--teacher", "resnet14", "--student", "resnet8", "--methods", "kd,dkd",
                  "--epochs", "1", cwd=tmp_path, env=env).returncode == 0
    proj = tmp_path / "proj"
    raw = yaml.safe_load((proj / "params.yaml").read_text())
    raw["data"]["synthetic"].update(train_size=64, test_size=32)
    for section in ("teacher", "student"):
        raw[section].update(batch_size=16)
        raw[section]["runtime"].update(device="cpu", workers=0)
    (proj / "params.yaml").write_text(yaml.safe_dump(raw))
    stages = ["data", "teacher", "distill@kd", "distill@dkd"]
    sh(DVC, "repro", "-q", *stages[2:], cwd=proj, env=env)
    assert json.loads(sh(DVC, "status", "--json", *stages, cwd=proj, env=env)) == {}

    dkd = tmp_path / "site" / "kdpipe" / "distill" / "dkd.py"
    dkd.write_text(dkd.read_text() + "\nNEW_RELEASE = 1\n")
    r = kdpipe("distill", "-m", "dkd", cwd=proj, env=env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "distill.dkd" in r.stderr and "kdpipe sync" in r.stderr
    record = (proj / project.CODE_FILE).read_bytes()
    r = kdpipe("sync", cwd=proj, env=env)
    assert r.returncode == 0 and "distill.dkd" in r.stdout
    assert set(json.loads(sh(DVC, "status", "--json", *stages, cwd=proj, env=env))) == {"distill@dkd"}
    assert (proj / project.CODE_FILE).read_bytes() != record
    record = (proj / project.CODE_FILE).read_bytes()
    r = kdpipe("sync", cwd=proj, env=env)
    assert "unchanged" in r.stdout and (proj / project.CODE_FILE).read_bytes() == record
