"""Each DVC stage depends on exactly the kdpipe files its command imports or opens (traced while the stages
ran: tools/stage_deps.py), so an edit anywhere in the code or data that decides a stage's results re-runs
it, and an edit elsewhere does not. cli.py (argument parsing) and the package's top __init__.py are exempt."""

import json
import re
from pathlib import Path

import pytest

from tools import stage_deps
from tools.stage_deps import check, traced_stages


def test_quickstart_stage_deps_are_the_code_each_stage_imports(repo):
    assert check(repo) == 1 + 2 + 7 + 9 + 2  # data, teacher, student, distill@7, evaluate@9, report, export


def test_full_pipeline_stage_deps_are_the_code_each_stage_imports(smoke_pipeline):
    from kdpipe import config

    n_methods = len(config.METHODS)
    # data, table, teacher, import-teacher, distill x methods, evaluate x (3 + methods), report; the +LS
    # variants of kd, dkd, mlkd: distill-ls and evaluate-ls x 3
    assert check(smoke_pipeline) == 4 + n_methods + 3 + n_methods + 1 + 2 * 3 + 1  # + wkd-cost of the teacher


@pytest.mark.parametrize("method", ["kd", "crd"])
def test_a_distillation_depends_on_its_own_method_file_alone(repo, method):
    # it imports every method's file to validate the params (each method's schema sits in its file), but depends on
    # its own and the shared ones alone: the others are what the check lets it leave out, its own never
    stages = {name: (imported, deps, validation) for name, imported, deps, _, validation in traced_stages(repo)}
    imported, deps, validation = stages[f"distill@{method}"]
    shared = {"distill/__init__.py", "distill/base.py", "distill/functional.py"}
    assert {d for d in deps if d.startswith("distill/")} == shared | {f"distill/{method}.py"}
    assert {f for f in imported if f.startswith("distill/")} - shared - {f"distill/{method}.py"} <= validation
    assert f"distill/{method}.py" not in validation and f"distill/{method}.py" in stages["teacher"][2]


def test_each_method_is_one_file_registering_its_own_name():
    # the distill stage's deps name kdpipe/distill/<method>.py: every method lives in the file of its name
    from kdpipe import config, distill

    files = {f.stem for f in Path(distill.__file__).parent.glob("*.py")} - {"__init__", "base", "functional"}
    assert files == set(config.METHODS)
    for m in config.METHODS:
        assert distill.get(m).method == m and distill.get(m).__module__ == f"kdpipe.distill.{m}"


def defined_in(name: str) -> Path:
    """The kdpipe file that defines the function or class `name` (at its top level)."""
    from .conftest import ROOT

    files = [f for f in (ROOT / "kdpipe").rglob("*.py") if re.search(rf"^(def|class) {name}\b", f.read_text(), re.M)]
    assert len(files) == 1, files
    return files[0]


def listed_by(project: Path, path: Path) -> tuple[set[str], set[str]]:
    """(the names of `project`'s stages, those whose deps list `path`: by path, or by a key of kdpipe-code.yaml)."""
    from dvc.repo import Repo

    from tools.stage_deps import code_deps

    from .conftest import ROOT

    rel = str(path.relative_to(ROOT / "kdpipe"))
    with Repo(str(project)) as repo:
        stages = repo.index.stages
        return {s.name for s in stages}, {s.name for s in stages if rel in code_deps(s, ROOT / "kdpipe")}


@pytest.mark.parametrize("project", [".", "pipelines/cifar10", "pipelines/cifar100", "pipelines/imagenet",
                                     "examples/compress"])
def test_dkds_loss_and_the_download_are_deps_of_their_stages_alone(project):
    # editing DKD's loss re-runs the DKD distillations, its variants' (DKD+LS) too, and the report, which reads each
    # method's label, no other method's; editing the CIFAR download re-runs the data stage, not the training that reads its output
    from .conftest import ROOT

    names, dkd = listed_by(ROOT / project, defined_in("dkd"))
    distill_dkd = {n for n in names if re.match(r"distill(-[a-z0-9_]+)?@dkd(-|$)", n)}
    assert distill_dkd and distill_dkd <= dkd <= distill_dkd | {"report"}, sorted(dkd - distill_dkd)
    assert listed_by(ROOT / project, defined_in("download"))[1] == {"data"}


def test_dvc_status_after_editing_dkds_loss_or_schema_or_the_download(repo):
    # the same on the reproduced quickstart, as DVC sees it: each edit makes its own stage stale, undone after; DKD's
    # params schema sits in its file, so changing its defaults or validation re-runs DKD alone
    from .conftest import DVC, ROOT, sh

    assert defined_in("DKDParams") == defined_in("dkd")
    for function, stale in (("dkd", {"distill@dkd"}), ("download", {"data"})):
        path = repo / defined_in(function).relative_to(ROOT)
        text = path.read_text()
        try:
            path.write_text(text + "\n# edited\n")
            assert set(json.loads(sh(DVC, "status", "--json", cwd=repo))) == stale
        finally:
            path.write_text(text)
    assert json.loads(sh(DVC, "status", "--json", cwd=repo)) == {}


def test_check_reports_a_missing_and_an_unused_dep(repo, monkeypatch):
    # the check itself fails when a stage's deps drift from its imports
    stages = traced_stages(repo)
    name, imported, deps, by_key, validation = next(s for s in stages if s[0] == "distill@kd")
    fake = [(name, imported, [d for d in deps if d != "runs.py" and d != "distill/kd.py"] + ["report.py"], by_key,
             validation)]
    monkeypatch.setattr(stage_deps, "traced_stages", lambda project, traces=None: fake)
    with pytest.raises(AssertionError, match=r"distill@kd: imports but does not depend on \['distill/kd.py', 'runs.py'\]; "
                                             r"depends on but never imports \['report.py'\]"):
        check(repo)


def test_full_pipelines_depend_on_files_not_folders():
    # outside a DVC project (../../kdpipe) no .dvcignore applies: a folder's hash would include __pycache__,
    # and any import would make the stages look changed
    import yaml

    from kdpipe import config

    from .conftest import ROOT

    stages = yaml.safe_load((ROOT / "pipelines/stages.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for dep in stage["deps"]:
            if dep.startswith("../../"):
                for m in config.METHODS:
                    path = ROOT / dep[6:].replace("${item.method}", m)
                    assert path.is_file(), f"{name}: {dep} is not a file"
