from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdpipe import config
from kdpipe.cli import app

from .conftest import ROOT, tiny_params, write_params


def errors_for(params: dict) -> list[str]:
    with pytest.raises(config.ParamsError) as e:
        config.validate(params)
    return e.value.lines


def test_tiny_and_repo_params_are_valid():
    config.validate(tiny_params())
    config.load_params(__import__("pathlib").Path(__file__).parents[1] / "params.yaml")


@pytest.mark.parametrize("updates, expected", [
    ({"teacher": {"optim": {"lr": -0.1}}}, "teacher.optim.lr: Input should be greater than 0 (got -0.1)"),
    ({"student": {"optim": {"momentum": 1.0}}}, "student.optim.momentum: Input should be less than 1 (got 1.0)"),
    ({"teacher": {"epochs": 0}}, "teacher.epochs: Input should be greater than or equal to 1 (got 0)"),
    ({"teacher": {"epochs": "many"}}, "teacher.epochs: Input should be a valid integer (got 'many')"),
    ({"teacher": {"epochs": "12"}}, "teacher.epochs: Input should be a valid integer (got '12')"),  # strict types
    ({"teacher": {"optim": {"lr": "0.1"}}}, "teacher.optim.lr: Input should be a valid number (got '0.1')"),
    ({"teacher": {"optim": {"nesterov": "yes"}}}, "teacher.optim.nesterov: Input should be a valid boolean (got 'yes')"),
    ({"teacher": {"runtime": {"cpu_isa": "avx512"}}}, "teacher.runtime.cpu_isa: Input should be 'native' or 'avx2'"),
    ({"data": {"dataset": "svhn"}}, "data.dataset: Input should be 'synthetic', 'cifar10', 'cifar100', 'folder' or 'imagenet' (got 'svhn')"),
    ({"student": {"model": "resnet21"}}, "student.model: unknown model 'resnet21'; valid models: resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110, resnet8x4, resnet32x4, resnet50, wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2, vgg8, vgg11, vgg13, vgg16, vgg19, mobilenetv2, shufflev1, shufflev2, mobilenetv1, tv/<torchvision model>, timm/<timm model> (got 'resnet21')"),
    ({"student": {"optim": {"lrr": 0.1}}}, "student.optim.lrr: unknown key (did you mean 'lr'?)"),
    ({"teacherr": {}}, "teacherr: unknown key (did you mean 'teacher'?)"),
    ({"student": {"schedule": {"milestones": [0.75, 0.5]}}}, "student.schedule.milestones: must be increasing fractions"),
    ({"student": {"runtime": {"device": "tpu"}}}, "student.runtime.device: must be auto, cpu, cuda or cuda:N (got 'tpu')"),
    ({"student": {"schedule": {"warmup_epochs": 5}}}, "student: schedule.warmup_epochs must be smaller than epochs"),
])
def test_errors_name_the_full_key_path(updates, expected):
    lines = errors_for(tiny_params(**updates))
    assert len(lines) == 1
    assert lines[0].startswith(expected)


def test_one_line_per_problem():
    lines = errors_for(tiny_params(teacher={"optim": {"lr": 0}, "batch_size": 1}, data={"synthetic": {"seed": -1}}))
    assert sorted(l.split(":")[0] for l in lines) == ["data.synthetic.seed", "teacher.batch_size", "teacher.optim.lr"]


def test_cli_bad_params_exit_2_and_write_nothing(workdir):
    write_params(workdir / "params.yaml", tiny_params(teacher={"optim": {"lr": 0}}, student={"epochz": 3}))
    for cmd in (["data"], ["teacher"], ["student"]):
        result = CliRunner().invoke(app, cmd)
        assert result.exit_code == 2
        assert result.output.splitlines() == ["error: teacher.optim.lr: Input should be greater than 0 (got 0)",
                                              "error: student.epochz: unknown key (did you mean 'epochs'?)"]
    assert sorted(p.name for p in workdir.iterdir()) == ["params.yaml"]


def test_cli_missing_and_malformed_params(workdir):
    result = CliRunner().invoke(app, ["data", "--params", "nope.yaml"])
    assert result.exit_code == 2 and "nope.yaml: params file not found" in result.output
    (workdir / "bad.yaml").write_text("data:\n  dataset: synthetic\n  mirror: a: b\n")
    result = CliRunner().invoke(app, ["data", "--params", "bad.yaml"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: bad.yaml: not valid YAML at line 3, column 12: mapping values are not allowed here"
    (workdir / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    assert CliRunner().invoke(app, ["data", "--params", "list.yaml"]).exit_code == 2


def test_ints_stay_valid_for_floats():
    assert config.validate(tiny_params(teacher={"optim": {"lr": 1}})).teacher.optim.lr == 1.0


@pytest.mark.parametrize("cmd, section", [(["data"], "data"), (["teacher"], "teacher"), (["student"], "student"),
                                          (["distill", "-m", "kd"], "student"), (["evaluate", "x"], "evaluate")])
def test_a_command_needs_the_sections_it_reads(workdir, cmd, section):
    raw = tiny_params()
    del raw[section]
    write_params(workdir / "params.yaml", raw)
    result = CliRunner().invoke(app, cmd)
    assert result.exit_code == 2
    assert result.output.strip() == f"error: params.yaml: missing section '{section}' (this command reads it)"
    (workdir / "params.yaml").write_text("")  # an empty file trains no built-in default either
    result = CliRunner().invoke(app, cmd)
    assert result.exit_code == 2 and "missing section" in result.output
    assert sorted(p.name for p in workdir.iterdir()) == ["params.yaml"]


def test_empty_method_term_is_an_error():
    for spec in ("kd+", "+kd", "kd++at", ""):
        with pytest.raises(config.ParamsError, match="empty term"):
            config.parse_methods(spec)


def test_a_relative_data_path_is_relative_to_the_params_file(tmp_path, monkeypatch):
    (tmp_path / "examples").mkdir()
    f = tmp_path / "examples" / "p.yaml"
    f.write_text(yaml.safe_dump({"data": {"dataset": "folder", "path": "../images"}}))
    monkeypatch.chdir(tmp_path / "examples")
    assert config.load_params("p.yaml").data.path == "../images"
    monkeypatch.chdir(tmp_path)
    assert config.load_params("examples/p.yaml").data.path == "images"
    f.write_text(yaml.safe_dump({"data": {"dataset": "folder", "path": "/abs/images"}}))
    assert config.load_params(f).data.path == "/abs/images"


def test_the_example_finds_the_shared_images_from_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    path = config.load_params("examples/real-images.yaml").data.path
    assert Path(path).resolve() == (ROOT.parent / "shared/data/cifar10-jpeg-mini").resolve()


def test_a_methods_own_recipe_merges_over_the_students():
    p = config.validate({"student": {"epochs": 20, "batch_size": 64, "optim": {"lr": 0.05, "lr_by_model": {"vgg8": 0.01}}},
                         "distill": {"dist": {"train": {"batch_size": 256, "optim": {"nesterov": True}}},
                                     "kd": {"train": {"optim": {"lr_by_model": {"resnet8": 0.2}}}}}})
    assert p.student_for(["at"]) is p.student  # no override: the student's section itself
    dist = p.student_for(["dist"])
    assert (dist.recipe, dist.epochs, dist.batch_size, dist.optim.lr, dist.optim.nesterov) == ("custom+dist", 20, 256, 0.05, True)
    both = p.student_for(["kd", "dist"])  # keys of several methods merge; mappings merge key by key
    assert (both.recipe, both.batch_size, both.optim.lr_by_model) == ("custom+kd+dist", 256, {"vgg8": 0.01, "resnet8": 0.2})


@pytest.mark.parametrize("train, expected", [
    ({"epoch": 3}, "distill.dist.train: epoch: not a recipe key (valid: epochs, batch_size, optim, schedule)"),
    ({"optim": {"nesterv": True}}, "distill.dist.train: optim.nesterv: unknown key (did you mean 'nesterov'?)"),
    ({"optim": {"no_decay": "bn"}}, "distill.dist.train: optim.no_decay: Input should be 'none' or 'norm_and_bias' (got 'bn')"),
    ({"batch_size": 1}, "distill.dist.train: batch_size: Input should be greater than or equal to 2 (got 1)"),
])
def test_a_bad_method_recipe_is_one_line_naming_the_key(train, expected):
    with pytest.raises(config.ParamsError) as e:
        config.validate({"distill": {"dist": {"train": train}}})
    assert e.value.lines == [expected]


def test_a_combination_whose_recipes_disagree_is_an_error():
    p = config.validate({"distill": {"dist": {"train": {"batch_size": 256}}, "kd": {"train": {"batch_size": 128}}}})
    with pytest.raises(config.ParamsError, match=r"distill.dist.train.batch_size: 256, but another method of the "
                                                  r"combination sets 128"):
        p.student_for(["kd", "dist"])


def test_variants_set_a_methods_keys_per_row_and_pair():
    raw = {"variants": {"ls": {"kd": {"alpha": 9.0, "by_pair": {"vgg13->vgg8": {"temperature": 3.0}}},
                               "dkd": {"by_pair": {}}}},
           "distill": {"dkd": {"by_pair": {"resnet56->resnet20": {"beta": 2.0}}}}}
    p = config.validate(raw)
    assert p.rows()[-2:] == ["kd+ls", "dkd+ls"]
    assert config.parse_run("kd+ls", p.variants) == (["kd"], "ls")
    assert config.parse_run("dkd+kd+ls", p.variants) == (["dkd", "kd"], "ls")
    assert config.parse_run("kd+at", p.variants) == (["kd", "at"], None)
    q = p.varied("ls", ["kd", "at"]).distill.for_pair("vgg13", "vgg8")
    assert (q.kd.alpha, q.kd.temperature, q.kd.gamma) == (9.0, 3.0, 0.1)
    assert q.at == p.distill.at  # a method the variant does not name keeps its keys
    assert p.varied("ls", ["kd"]).distill.for_pair("resnet56", "resnet20").kd.temperature == 4.0
    # a variant's mapping replaces the method's: DKD's per-pair beta is gone
    assert p.varied("ls", ["dkd"]).distill.for_pair("resnet56", "resnet20").dkd.beta == 8.0
    assert p.distill.for_pair("resnet56", "resnet20").dkd.beta == 2.0
    assert p.varied(None, ["kd"]) is p


@pytest.mark.parametrize("variants, expected", [
    ({"kd": {"kd": {}}}, "variants.kd: a tag is a lower-case word that is not a method's name"),
    ({"LS": {"kd": {}}}, "variants.LS: a tag is a lower-case word"),
    ({"ls": {"nope": {}}}, "variants.ls.nope: unknown method"),
    ({"ls": {"kd": {"alpah": 9.0}}}, "variants.ls.kd: alpah: unknown key"),
    ({"ls": {"kd": {"temperature": -1.0}}}, "variants.ls.kd: temperature: Input should be greater than 0"),
    ({"ls": {"kd": {"by_pair": {"vgg13": {"alpha": 1.0}}}}}, "key 'vgg13' is not 'teacher->student'"),
    ({"ls": {"kd": {"by_pair": {"vgg13->vgg8": {"train": {"epochs": 1}}}}}}, "train: not a key this method sets per pair"),
])
def test_a_bad_variant_is_one_line_naming_it(variants, expected):
    with pytest.raises(config.ParamsError) as e:
        config.validate({"variants": variants})
    assert len(e.value.lines) == 1 and expected in e.value.lines[0], e.value.lines


def test_a_variant_must_define_each_method_of_the_run():
    p = config.validate({"variants": {"ls": {"kd": {"alpha": 9.0}}}})
    with pytest.raises(config.ParamsError, match=r"'at\+ls': variants.ls defines no at \(it has: kd\)"):
        config.parse_run("at+ls", p.variants)
