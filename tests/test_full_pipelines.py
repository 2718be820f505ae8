"""The full pipelines: params, stage graphs, one stage definition, the report of a whole grid, and experiments
compared across git revisions (on the smoke fixture: pipelines/cifar100 with every method and kind of stage)."""

import json
import re

import pytest
import yaml

from kdpipe import config, engine, published

from .conftest import DVC, ROOT, sh
from .test_pipeline import dag_edges

EXPECTED = {"cifar10": 10, "cifar100": 100}
PIPELINES = (*EXPECTED, "imagenet")
CRD_PAIRS = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
             ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("vgg13", "mobilenetv2"),
             ("resnet50", "mobilenetv2"), ("resnet50", "vgg8"), ("resnet32x4", "shufflev1"),
             ("resnet32x4", "shufflev2"), ("wrn_40_2", "shufflev1")]


@pytest.mark.parametrize("name", EXPECTED)
def test_params_validate_with_recipes(name):
    p = config.load_params(ROOT / "pipelines" / name / "params.yaml")
    assert p.data.dataset == name and p.data.synthetic.num_classes == EXPECTED[name]
    he = p.recipes["he2016"]  # batch 128, SGD 0.9, wd 1e-4, lr 0.1 /10 at 50 % and 75 %, 164 epochs
    assert (he.epochs, he.batch_size, he.optim.lr, he.optim.momentum, he.optim.weight_decay) == (164, 128, 0.1, 0.9, 1e-4)
    assert he.schedule.milestones == [0.5, 0.75]
    rd = p.recipes["repdistiller"]
    assert [round(m * rd.epochs) for m in rd.schedule.milestones] == [150, 180, 210] and rd.epochs == 240
    assert (rd.batch_size, rd.optim.lr, rd.optim.weight_decay) == (64, 0.05, 5e-4)
    # CIFAR-100 compares with CRD's figures, which come from RepDistiller's recipe; CIFAR-10 keeps He et al.'s
    recipe = {"cifar10": "he2016", "cifar100": "repdistiller"}[name]
    assert p.teacher.recipe == p.student.recipe == recipe
    assert p.teacher.model_dump(exclude={"recipe", "model", "weights", "seed", "runtime"}) == \
        p.student.model_dump(exclude={"recipe", "model", "weights", "seed", "runtime"}) == p.recipes[recipe].model_dump()
    assert p.methods == list(config.METHODS)  # every method is staged for every pair
    # FSP and FitNets as RepDistiller runs them
    assert p.distill.fsp.init_epochs == 30 and p.distill.fitnets.regressor_kernel == 1
    assert (p.distill.ab.init_epochs, p.distill.ab.beta, p.distill.ft.init_epochs, p.distill.ft.beta) == (30, 1, 30, 200)
    # the ResNet table in both: the five ResNets with He et al.'s recipe (Top1 best epoch, Top5 last epoch)
    assert p.table_models == ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
    assert p.table.recipe == "he2016" and p.table.model_dump(exclude={"recipe", "model", "weights", "seed", "runtime"}) == \
        p.recipes["he2016"].model_dump()
    if name == "cifar10":  # the table's runs are the pairs' teachers and baselines
        assert p.models == [] and p.published == []
        assert {m for pr in p.pairs for m in (pr.teacher, pr.student)} <= set(p.table_models)
        return
    # CIFAR-100: CRD's 13 pairs, its teachers imported, every other model trained (the students' baselines)
    assert [(pr.teacher, pr.student) for pr in p.pairs] == CRD_PAIRS
    assert set(p.published) == {t for t, _ in CRD_PAIRS} and set(p.models) == {s for _, s in CRD_PAIRS}
    # RepDistiller trains MobileNetV2 and the ShuffleNets at lr 0.01, as teachers or students
    assert {m: p.student.model_copy(update={"model": m}).lr for m in ("mobilenetv2", "shufflev1", "shufflev2", "vgg8")} \
        == {"mobilenetv2": 0.01, "shufflev1": 0.01, "shufflev2": 0.01, "vgg8": 0.05}
    # DKD's beta per pair as mdistiller's configs/cifar100/dkd/*.yaml (8 where they do not set it)
    betas = {pair: p.distill.for_pair(*pair).dkd.beta for pair in CRD_PAIRS}
    assert betas[("resnet56", "resnet20")] == betas[("resnet110", "resnet32")] == 2.0
    assert betas[("vgg13", "vgg8")] == betas[("wrn_40_2", "wrn_16_2")] == betas[("vgg13", "mobilenetv2")] == 6.0
    assert betas[("resnet32x4", "resnet8x4")] == betas[("resnet50", "mobilenetv2")] == 8.0


def test_cifar100_sets_each_methods_per_pair_values_as_its_authors_configs():
    p = config.load_params(ROOT / "pipelines/cifar100/params.yaml")
    at = {pair: p.distill.for_pair(*pair) for pair in CRD_PAIRS}

    def differing(get, default):
        return {pair: get(d) for pair, d in at.items() if get(d) != default}

    # WKD-L: JiamingLv/WKD configs/cifar100/wkd_l/res32x4_res8x4.yaml:23,32 (weight 600, T 8) and
    # wrn40_2_shuv1.yaml:23,32 (200, 6), its only CIFAR-100 configs
    assert differing(lambda d: (d.wkd.beta, d.wkd.temperature), (600, 8)) == {("wrn_40_2", "shufflev1"): (200, 6)}
    # SD-DKD: DKD.BETA of SDD-CVPR2024's configs/cifar100/sdd_dkd/<pair>.yaml:18-19 (8 where unset); M [1,2] in
    # teacher_vgg.sh:11-12 (vgg13 -> vgg8) and teacher_resnet32x4.sh:24-25 (resnet32x4 -> resnet8x4, SD-KD/SD-NKD)
    assert differing(lambda d: d.sdd.beta, 8) == {
        ("resnet56", "resnet20"): 2, ("resnet110", "resnet32"): 2, ("wrn_40_2", "wrn_16_2"): 6,
        ("wrn_40_2", "wrn_40_1"): 6, ("vgg13", "vgg8"): 6, ("vgg13", "mobilenetv2"): 6}
    assert differing(lambda d: d.sdd.levels, [1, 2, 4]) == {("vgg13", "vgg8"): [1, 2], ("resnet32x4", "resnet8x4"): [1, 2]}
    # ReviewKD: dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh:11,13,15 (5 on its other lines, mdistiller's 5)
    assert differing(lambda d: d.reviewkd.beta, 5) == {
        ("resnet32x4", "shufflev2"): 8, ("resnet56", "resnet20"): 0.6, ("resnet110", "resnet32"): 1}
    # DIST, MLKD, CTKD, RLD, WTTM: their repositories set no loss key per pair (only the lr, and MLKD its epochs:
    # docs/pipelines.md)
    assert all(getattr(p.distill, m).by_pair == {} for m in ("dist", "mlkd", "ctkd", "rld", "wttm"))


def test_recipe_overrides_and_errors():
    raw = yaml.safe_load((ROOT / "pipelines/cifar10/params.yaml").read_text())
    raw["teacher"]["epochs"] = 7
    raw["student"]["recipe"] = "repdistiller"
    p = config.validate(raw)
    assert p.teacher.epochs == 7 and p.teacher.optim.lr == 0.1  # per-key override on top of he2016
    assert p.student.epochs == 240 and p.student.batch_size == 64
    raw["student"]["recipe"] = "nope"
    with pytest.raises(config.ParamsError, match="student.recipe: unknown recipe 'nope'.*he2016, repdistiller, smoke"):
        config.validate(raw)


def test_one_definition_for_every_pipeline():
    # each folder's dvc.yaml is a real file (DVC does not follow links in git revisions) written by
    # `make pipelines` from pipelines/stages.yaml: it must not drift from it
    import runpy

    render = runpy.run_path(str(ROOT / "pipelines" / "render.py"))["render"]
    stages = (ROOT / "pipelines" / "stages.yaml").read_text()
    for name in PIPELINES:
        f = ROOT / "pipelines" / name / "dvc.yaml"
        assert not f.is_symlink()
        assert f.read_text() == render(name), f"{f} differs from pipelines/stages.yaml: run `make pipelines`"
        body = f.read_text().partition("\n")[2]
        # every stage of the ImageNet pipeline validates tv/ names
        library = "      - ../../kdpipe/models/library.py\n      - ../../kdpipe/models/tv.py\n"
        p = config.load_params(ROOT / "pipelines" / name / "params.yaml")
        named = set(p.methods).union(*p.variants.values())
        methods = "".join(f"      - ../../kdpipe/distill/{m}.py\n" for m in sorted(named))  # the report's
        marker = "      # the files of params.yaml's `methods`: written here by pipelines/render.py\n"
        # WKD with its CKA cost: a cost stage per teacher, and WKD's distillations apart, depending on their teacher's
        if "wkd" in p.methods and p.distill.wkd.cost == "cka":
            cost, alone = (re.search(rf"\n  {s}:\n.*?\n\n", body, re.S).group(0) for s in ("wkd-cost", "distill-cka"))
            body = body.replace(cost, "\n").replace(alone, "\n").replace(
                f"      method: [{', '.join(m for m in p.methods if m != 'wkd')}]\n", "      method: ${methods}\n")
            assert "cmd: kdpipe wkd-cost --teacher" in cost and "teacher: ${wkd_teachers}" in cost
            dep = "      - models/${teacher.recipe}-${item.pair.teacher}-s${item.seed}.wkd-cost.pt\n"
            assert dep in alone and alone.replace("  distill-cka:", "  distill:").replace(dep, "").replace(
                "method: [wkd]", "method: ${methods}") in body
        # a variant's stages: the distill and evaluate-distill stages over its methods, named for it
        for tag in p.variants:
            for stage, variant in (("distill", f"distill-{tag}"), ("evaluate-distill", f"evaluate-{tag}")):
                block = re.search(rf"\n  {variant}:\n.*?\n\n", body, re.S).group(0)
                body = body.replace(block, "\n")
                block = (block.replace(f"${{variants.{tag}}}", "${methods}").replace(f"+{tag}", "")
                         .replace(f"      - variants.{tag}.${{item.method}}\n", "").replace(variant, stage))
                assert block in body, variant
        assert body.replace(library, "") == stages.replace(marker, methods) and (library in body) == (name == "imagenet")


def test_report_deps_follow_the_methods_list(tmp_path):
    # the report imports the files of the methods it lists (their labels), no other: a pipeline running a subset
    # of methods renders with that subset's files, so its deps still equal its imports (tests/test_stage_deps.py)
    import runpy

    render = runpy.run_path(str(ROOT / "pipelines" / "render.py"))["render"]
    params = yaml.safe_load((ROOT / "pipelines" / "cifar100" / "params.yaml").read_text())
    params["methods"] = ["kd", "crd", "dkd"]
    params["variants"] = {"ls": {m: params["variants"]["ls"][m] for m in ("kd", "dkd")}}  # a variant's method: a row
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    report = yaml.safe_load(render(str(tmp_path)))["stages"]["report"]
    methods = sorted(d.split("/")[-1] for d in report["deps"] if "/distill/" in d)
    assert methods == ["__init__.py", "base.py", "crd.py", "dkd.py", "functional.py", "kd.py"]


def test_stage_graph_cifar100_published_teachers():
    folder = ROOT / "pipelines" / "cifar100"
    stages = [line.split()[0] for line in sh(DVC, "stage", "list", cwd=folder).splitlines()]
    # + the "+LS" variants of KD, DKD and MLKD (stages distill-ls@..., evaluate-ls@...), + WKD's CKA cost per teacher
    n_table, n_models, n_published, n_dist = 5 * 3, 9 * 3, 6 * 3, (len(config.METHODS) + 3) * 13 * 3
    assert len(stages) == 1 + 2 * n_table + 2 * n_models + 2 * n_published + 2 * n_dist + 1 + 6 * 3
    assert {"import-teacher@resnet32x4-0", "evaluate-published@resnet50-2", "teacher@shufflev2-1",
            "distill@crd-pair12-2", "evaluate-distill@dkd-pair7-0", "table@resnet44-2", "evaluate-table@resnet110-0",
            "distill-ls@mlkd-pair5-0", "evaluate-ls@kd-pair8-2"} <= set(stages)
    edges = dag_edges(folder)
    assert {a for a, b in edges if b == "distill@kd-pair11-1"} == {"data", "import-teacher@resnet32x4-1"}
    # WKD's distillation reads its teacher's CKA cost, computed once per teacher and seed (wkd_l/*.yaml's 'cka')
    assert {a for a, b in edges if b == "distill-cka@wkd-pair11-1"} == \
        {"data", "import-teacher@resnet32x4-1", "wkd-cost@resnet32x4-1"}
    assert {a for a, b in edges if b == "wkd-cost@resnet32x4-1"} == {"data", "import-teacher@resnet32x4-1"}
    assert len({b for a, b in edges if a == "wkd-cost@wrn_40_2-0"}) == 3  # its three pairs' WKD students
    assert ("import-teacher@resnet56-0", "evaluate-published@resnet56-0") in edges
    # ResNet-20 twice, under two recipes: the ResNet table (he2016) and CRD's baseline (repdistiller)
    assert "table@resnet20-0" in stages and "teacher@resnet20-0" in stages
    assert ("table@resnet20-0", "evaluate-table@resnet20-0") in edges and ("teacher@resnet20-0", "report") not in edges


@pytest.mark.parametrize("name", ["cifar10"])
def test_stage_graph(name):
    folder = ROOT / "pipelines" / name
    stages = [line.split()[0] for line in sh(DVC, "stage", "list", cwd=folder).splitlines()]
    n_table, n_dist = 5 * 3, len(config.METHODS) * 3 * 3  # table models x seeds, methods x pairs x seeds
    assert len(stages) == 1 + 2 * n_table + 2 * n_dist + 1 + 2 * 3  # + WKD's cost: 2 teachers x seeds
    assert {"data", "table@resnet110-2", "distill@fitnets-pair2-1", "evaluate-distill@kd-pair0-0", "report"} <= set(stages)
    edges = dag_edges(folder)
    for edge in [("data", "table@resnet20-0"), ("table@resnet56-1", "distill@kd-pair0-1"),
                 ("table@resnet110-2", "distill@nst-pair2-2"), ("distill@kd-pair0-1", "evaluate-distill@kd-pair0-1"),
                 ("table@resnet20-0", "evaluate-table@resnet20-0"), ("evaluate-distill@fsp-pair1-0", "report"),
                 ("evaluate-table@resnet110-2", "report")]:
        assert edge in edges, edge
    # each distilled student depends on the teacher of its own pair and seed, and on no other
    assert {a for a, b in edges if b == "distill@at-pair1-2"} == {"data", "table@resnet110-2"}


def test_root_dvc_project_is_the_quickstart_alone():
    # pipelines/cifar10 and pipelines/cifar100 are DVC projects of their own (`dvc init --subdir`), so DVC
    # commands at the root see only the quickstart's stages
    for name in EXPECTED:
        assert (ROOT / "pipelines" / name / ".dvc" / "config").is_file()
    stages = {line.split()[0] for line in sh(DVC, "stage", "list", cwd=ROOT).splitlines()}
    assert "teacher" in stages and "report" in stages
    assert not any("pair" in s or s.startswith("evaluate-") for s in stages), stages


def test_the_report_of_a_whole_grid(smoke_pipeline):
    """Every method has its row, the imported teacher is reported, and the ResNet table and the baselines train
    the same model under their own recipes (two checkpoints)."""
    from kdpipe import distill

    p = config.load_params(smoke_pipeline / "params.yaml")
    text = (smoke_pipeline / "reports/results.md").read_text()
    assert "## Distillation" in text
    missing = [m for m in config.METHODS if not re.search(rf"\| {re.escape(distill.get(m).label)}( [†‡])* \|", text)]
    assert not missing, f"the report lacks rows for {missing}"
    # ReviewKD runs its authors' script's recipe (distill.reviewkd.train): its row says so, and which recipe
    assert "| ReviewKD ‡ |" in text and "| KD |" in text
    assert "‡ ReviewKD: its published figures' own recipe ran, `repdistiller+reviewkd` (1 epochs, batch 128, Nesterov SGD lr 0.1" \
        in text
    # the "+LS" variants are rows of their own (marked † beside their published figures on CIFAR-100 only: the
    # smoke data is synthetic), trained with the variant's keys
    assert all(re.search(rf"\| {m}\+LS \|", text) for m in ("KD", "DKD", "MLKD")), text
    import torch
    meta = torch.load(smoke_pipeline / "models/kd+ls-resnet14-resnet8-s0.pt", weights_only=False)["meta"]
    assert meta["variant"] == "ls" and meta["method"] == "kd"
    assert {k: meta["distill"]["kd"][k] for k in ("logit_std", "alpha", "temperature")} == \
        {"logit_std": True, "alpha": 9.0, "temperature": 2.0}
    assert "variant" not in torch.load(smoke_pipeline / "models/kd-resnet14-resnet8-s0.pt", weights_only=False)["meta"]
    assert re.search(r"\| ResNet-14 \(published\)( ⚠)? \|", text)  # ⚠: a one-class model (a random teacher)
    assert "## The ResNet table" in text
    assert p.table.recipe != p.teacher.recipe
    for recipe in (p.table.recipe, p.teacher.recipe):
        assert (smoke_pipeline / f"models/{recipe}-resnet8-s0.pt").stat().st_size > 0


def test_experiments_compare_across_revisions(smoke_pipeline):
    # DVC reads dvc.yaml, params and metrics from git revisions: `dvc exp show` has the values of main and of
    # the experiment, and `dvc metrics diff` rows comparing them
    folder = smoke_pipeline
    out = sh(DVC, "exp", "run", "-S", "distill.kd.temperature=2.0", cwd=folder)
    assert "Running stage 'distill@kd-pair0-0'" in out and "Running stage 'distill@at-pair0-0'" not in out
    shown = json.loads(sh(DVC, "exp", "show", "--json", cwd=folder))
    main = next(r for r in shown if r["rev"] != "workspace")
    exps = [e for x in main["experiments"] or [] for e in x["revs"]]
    assert len(exps) == 1
    name = "metrics/kd-resnet14-resnet8-s0.json"
    for rev, temperature in ((main, 4.0), (exps[0], 2.0)):
        data = rev["data"]
        assert data["params"]["params.yaml"]["data"]["distill"]["kd"]["temperature"] == temperature
        assert set(data["metrics"][name]["data"]) >= {"top1", "top5", "top1_last"}, rev["rev"]
        assert len(data["metrics"]) == 3 + len(config.METHODS) + 3  # table, teacher, published, distilled, +LS
    diff = json.loads(sh(DVC, "metrics", "diff", "HEAD", "--all", "--json", cwd=folder))
    assert set(diff[name]) >= {"top1", "top1_last"} and all("old" in v and "new" in v for v in diff[name].values())
    rows = sh(DVC, "metrics", "diff", "HEAD", "--all", cwd=folder)
    assert rows.count("kd-resnet14-resnet8-s0.json") >= 3


def unspelled(raw: dict, schema, path: str = "", skip: frozenset = frozenset()) -> list[str]:
    """Keys of `schema` that `raw` leaves to their defaults (recursively; `skip`: key paths set another way)."""
    from pydantic import BaseModel

    out = []
    for name, field in schema.model_fields.items():
        if path + name in skip:
            continue
        if name not in raw:
            out.append(path + name)
            continue
        ann, value = field.annotation, raw[name]
        if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(value, dict):
            out += unspelled(value, ann, f"{path}{name}.", skip)
        elif name == "recipes":
            out += [k for r, v in value.items() for k in unspelled(v, config.Recipe, f"recipes.{r}.")]
    return out


MATRIX_KEYS = frozenset(f"{s}.{k}" for s in config.TRAIN_SECTIONS for k in ("model", "seed"))
# the full pipelines read every section but the deployment ones (`kdpipe quantize`, `qat`, `measure`: no stage)
PIPELINE_SECTIONS = tuple(s for s in config.Params.model_fields if s not in config.DEPLOY_SECTIONS)


@pytest.mark.parametrize("path, sections, skip", [
    # the quickstart's stages read these sections (and `kdpipe distill -m NAME` any method's)
    ("params.yaml", ("data", "teacher", "student", "distill", "evaluate"), frozenset()),
    # the full pipelines read every section; model and seed come from each stage's --model/--seed
    ("pipelines/cifar10/params.yaml", PIPELINE_SECTIONS, MATRIX_KEYS),
    ("pipelines/cifar100/params.yaml", PIPELINE_SECTIONS, MATRIX_KEYS),
    ("pipelines/imagenet/params.yaml", PIPELINE_SECTIONS, MATRIX_KEYS),
    # the compress example stages KD and DKD only
    ("examples/compress/params.yaml", ("data", "teacher", "student", "distill", "evaluate"),
     frozenset(f"distill.{m}" for m in config.METHODS if m not in ("kd", "dkd"))),
])
def test_params_files_spell_out_every_key(path, sections, skip):
    # a changed default in kdpipe/config/ must never change a pipeline's results silently: every key a
    # stage reads is in its params file (training sections after their recipe is merged in)
    raw = yaml.safe_load((ROOT / path).read_text())
    merged = config.Params._apply_recipes(raw)
    assert set(sections) <= set(merged), f"{path}: sections missing: {set(sections) - set(merged)}"
    missing = [k for k in unspelled({s: merged[s] for s in sections}, config.Params, skip=skip)
               if k.split(".")[0] in sections]
    assert not missing, f"{path} leaves these keys to kdpipe's defaults: {missing}"
    config.validate(raw)


def test_unspelled_finds_a_default():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["distill"]["ab"]["margin"], raw["evaluate"]["cpu_threads"]
    assert unspelled(raw, config.Params, skip=frozenset({"recipes", "table", "table_models", "models", "published",
                                                         "seeds", "launch", "methods", "pairs", "variants",
                                                         "group_students", "wkd_teachers", *config.DEPLOY_SECTIONS})) == \
        ["distill.ab.margin", "evaluate.cpu_threads"]


def test_imagenet_pipeline_is_mdistillers_recipe():
    # mdistiller's configs/imagenet/{r34_r18,r50_mv1}/*.yaml: 100 epochs, SGD 0.9, wd 1e-4, x0.1 at 30/60/90,
    # lr 0.2 at batch 512 (0.1 per 256); KD T 1 with 0.5/0.5; DKD beta 0.5 / 2.0, T 1, one warm-up epoch
    p = config.load_params(ROOT / "pipelines/imagenet/params.yaml")
    assert (p.data.dataset, p.data.source, p.data.augment, p.data.normalize, p.data.image_size, p.data.subset) == \
        ("imagenet", "stream", "imagenet", "imagenet", 224, False)
    assert [(pr.teacher, pr.student) for pr in p.pairs] == [("tv/resnet34", "tv/resnet18"), ("tv/resnet50", "mobilenetv1")]
    assert p.published == ["tv/resnet34", "tv/resnet50"] and p.models == ["tv/resnet18", "mobilenetv1"] and not p.table_models
    for cfg in (p.teacher, p.student):
        assert (cfg.recipe, cfg.epochs, cfg.batch_size, cfg.lr, cfg.optim.momentum, cfg.optim.weight_decay) == \
            ("imagenet", 100, 512, 0.2, 0.9, 1e-4)
        assert [round(m * cfg.epochs) for m in cfg.schedule.milestones] == [30, 60, 90] and cfg.weights is None
    assert (p.distill.kd.gamma, p.distill.kd.alpha, p.distill.kd.temperature) == (0.5, 0.5, 1.0)
    dkd = {pair: p.distill.for_pair(*pair).dkd for pair in (("tv/resnet34", "tv/resnet18"), ("tv/resnet50", "mobilenetv1"))}
    assert [(d.beta, d.tckd, d.temperature, d.warmup_epochs) for d in dkd.values()] == [(0.5, 1.0, 1.0, 1), (2.0, 1.0, 1.0, 1)]
    # every method but WTTM, whose authors publish no ImageNet setting (its params line says so)
    assert p.methods == [m for m in config.METHODS if m != "wttm"] and p.launch == "kdpipe"
    stages = [line.split()[0] for line in sh(DVC, "stage", "list", cwd=ROOT / "pipelines/imagenet").splitlines()]
    assert len(stages) == 1 + 2 * 2 + 2 * 2 + 2 * len(p.methods) * 2 + 1 + 2  # + WKD's cost per teacher
    assert {"import-teacher@tv/resnet34-0", "evaluate-teacher@mobilenetv1-0", "distill@dkd-pair1-0"} <= set(stages)


def test_each_published_figure_runs_its_own_recipe():
    # distill.<method>.train: the recipe the published figure came from, where it is not the pipeline's
    def epochs_at(cfg):  # the 0-based epochs from which the lr is lower
        return [round(m * cfg.epochs) for m in cfg.schedule.milestones]

    p = config.load_params(ROOT / "pipelines/imagenet/params.yaml")
    dist = p.student_for(["dist"])
    # hunto/image_classification_sota configs/strategies/distill/resnet_dist.yaml: batch_size 32 (x 8 GPUs in
    # DIST_KD's README command, tools/dist_train.sh 8), lr 0.1, weight_decay 1e-4, sched step, decay_epochs 30;
    # tools/train.py:130-137: nesterov=not args.sgd_no_nesterov, filter_bias_and_bn=not args.opt_no_filter;
    # lib/utils/optim.py:48-56: no decay where len(param.shape) == 1 or the name ends in .bias
    assert (dist.batch_size, dist.lr, dist.optim.weight_decay, dist.optim.nesterov, dist.optim.no_decay, dist.epochs) == \
        (256, 0.1, 1e-4, True, "norm_and_bias", 100)
    assert epochs_at(dist) == [30, 60, 90]
    ofd = p.student_for(["ofd"])
    # clovaai/overhaul-distillation ImageNet/train_with_distillation.py:24-28 (100 epochs, batch 256, lr 0.1,
    # wd 1e-4), :87-88 (nesterov=True, no parameter groups), :94-95 and :223-225 (epochs from 1, lr x0.1 ** (epoch // 30):
    # the 30th epoch, 0-based 29, is the first at 0.01)
    assert (ofd.batch_size, ofd.lr, ofd.optim.weight_decay, ofd.optim.nesterov, ofd.optim.no_decay, ofd.epochs) == \
        (256, 0.1, 1e-4, True, "none", 100)
    assert epochs_at(ofd) == [29, 59, 89]
    assert engine.learning_rate(ofd, 28, 0, 10) == pytest.approx(0.1) and engine.learning_rate(ofd, 29, 0, 10) == pytest.approx(0.01)
    assert all(p.student_for([m]) == p.student for m in p.methods if m not in ("dist", "ofd"))

    p = config.load_params(ROOT / "pipelines/cifar100/params.yaml")
    rkd = p.student_for(["reviewkd"])
    # dvlab-research/ReviewKD CIFAR-100/train.py:23-33 (batch 128, 240 epochs, lr 0.1, gamma 0.1, steps
    # [150, 180, 210], wd 5e-4), :168-169 (lr 0.02 where 'shuffle' or 'mobile' is in the model's name), :178-179
    # (nesterov=True); util/misc.py:55-60 lr_schedule runs after epoch `epoch` (0-based) is trained, so the
    # lower lr starts at epochs 151/181/211
    assert (rkd.batch_size, rkd.epochs, rkd.optim.lr, rkd.optim.weight_decay, rkd.optim.nesterov) == (128, 240, 0.1, 5e-4, True)
    assert epochs_at(rkd) == [151, 181, 211]
    lrs = {m: rkd.model_copy(update={"model": m}).lr for m in ("mobilenetv2", "shufflev1", "shufflev2", "resnet8x4", "vgg8")}
    assert lrs == {"mobilenetv2": 0.02, "shufflev1": 0.02, "shufflev2": 0.02, "resnet8x4": 0.1, "vgg8": 0.1}
    assert all(p.student_for([m]) == p.student for m in p.methods if m != "reviewkd")
    # its published table compares the best epoch: the script keeps best_acc (train.py:251-253)
    assert published.METHOD_TABLES["reviewkd"]["metric"] == "top1"


@pytest.mark.parametrize("launch, ok", [("kdpipe", True), ("torchrun --standalone --nproc-per-node 8 -m kdpipe", True),
                                        ("python -m kdpipe", False), ("torchrun --nproc-per-node 8 kdpipe", False)])
def test_launch_is_kdpipe_or_torchrun(launch, ok):
    # the training stages' command (stages.yaml: `${launch} teacher|distill ...`); DDP keeps the params' global batch
    raw = yaml.safe_load((ROOT / "pipelines/imagenet/params.yaml").read_text())
    raw["launch"] = launch
    if ok:
        assert config.validate(raw).launch == launch
    else:
        with pytest.raises(config.ParamsError, match="launch: must be kdpipe, or torchrun"):
            config.validate(raw)
    stages = yaml.safe_load((ROOT / "pipelines/stages.yaml").read_text())["stages"]
    assert [n for n, st in stages.items() if st["cmd"].startswith("${launch}")] == ["table", "teacher", "distill"]


def test_the_ls_variants_are_their_authors_settings():
    # sunshangquan/logit-standardization-KD tools/train.py, the `if args.logit_stand` block: KD and MLKD take
    # KD_WEIGHT := --kd-weight (9) and KD.TEMPERATURE := --base-temp (2); DKD takes ALPHA := ALPHA * kd-weight and
    # BETA := (the new) ALPHA * kd-weight, and keeps DKD.T (base-temp sets KD.TEMPERATURE, which DKD does not
    # read); mdistiller/distillers/KD.py:7-10 `normalize`: (z - mean) / (1e-7 + std). Per pair, its logs' names
    # logs/KD/kd,<teacher>,<student>,<T>,<weight>.txt: vgg13 pairs and ResNet50 -> MobileNetV2 at T 3 (the latter
    # weight 1), resnet110 -> resnet20 at T 4, weight 12
    p = config.load_params(ROOT / "pipelines/cifar100/params.yaml")
    assert p.rows()[-3:] == ["kd+ls", "dkd+ls", "mlkd+ls"]

    def ls(t, s):
        return p.varied("ls", ["kd", "dkd", "mlkd"]).distill.for_pair(t, s)

    for (t, s), (temperature, weight) in {("resnet32x4", "resnet8x4"): (2.0, 9.0), ("vgg13", "vgg8"): (3.0, 9.0),
                                          ("vgg13", "mobilenetv2"): (3.0, 9.0), ("resnet50", "mobilenetv2"): (3.0, 1.0),
                                          ("resnet110", "resnet20"): (4.0, 12.0), ("resnet56", "resnet20"): (2.0, 9.0)}.items():
        d = ls(t, s)
        assert (d.kd.logit_std, d.kd.temperature, d.kd.alpha, d.kd.gamma) == (True, temperature, weight, 0.1), (t, s)
        # DKD: every pair at TCKD 9, NCKD 81 (mdistiller's per-pair BETA does not survive), T 4, CE 1
        assert (d.dkd.logit_std, d.dkd.tckd, d.dkd.beta, d.dkd.temperature, d.dkd.gamma) == (True, 9.0, 81.0, 4.0, 1.0)
        assert (d.mlkd.logit_std, d.mlkd.beta, d.mlkd.temperature, d.mlkd.gamma) == (True, 9.0, 2.0, 0.1)
    # the plain rows keep their own settings
    assert p.distill.for_pair("resnet56", "resnet20").dkd.beta == 2.0 and not p.distill.kd.logit_std


def test_the_grouped_grid_trains_what_the_solo_grid_does(smoke_pipeline, smoke_grouped):
    """`group_students: true`: one distill stage per pair and seed; every row's checkpoint and log equal the solo
    grid's (pipelines/cifar100 in its committed form), byte for byte."""
    from tools.stage_deps import check

    def committed_outs(folder):  # path -> md5 in the committed dvc.lock (another test runs experiments there)
        lock = yaml.safe_load(sh("git", "show", "HEAD:pipelines/cifar100/dvc.lock", cwd=folder))
        return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}

    solo, grouped = committed_outs(smoke_pipeline), committed_outs(smoke_grouped)
    for row in ["kd", "dkd", "ofd", "ft", "mlkd", "kd+ls", "dkd+ls", "mlkd+ls"]:
        for f in (f"models/{row}-resnet14-resnet8-s0.pt", f"logs/{row}-resnet14-resnet8-s0.json"):
            assert grouped[f] == solo[f], f
    # data, table, teacher, import-teacher, one distill per pair and seed, evaluate x (3 + 5 methods), report,
    # evaluate-ls x 3: each depends on exactly the code it imports (the grouped stage on each method's file)
    assert check(smoke_grouped) == 4 + 1 + 3 + 5 + 1 + 3
    # editing one method's file re-runs its pair's group (every student of it; the only distill stage here)
    dkd = smoke_grouped.parents[1] / "kdpipe/distill/dkd.py"
    original = dkd.read_text()
    try:
        dkd.write_text(original + "# an edit\n")
        stale = json.loads(sh(DVC, "status", "--json", cwd=smoke_grouped))
        assert set(stale) == {"distill@pair0-0", "report"}, stale  # the report reads each method's label
    finally:
        dkd.write_text(original)
