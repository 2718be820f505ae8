"""The quickstart dvc.yaml: per-key params, so a change re-runs only what depends on it."""

import contextlib
import json
import re
import shutil

import yaml

from .conftest import DVC, ROOT, sh, tiny_params  # noqa: F401  (DVC, sh: used by other test modules too)


def dag_edges(repo) -> set[tuple[str, str]]:
    """(upstream, downstream) stage pairs from `dvc dag --md` (mermaid: nodeN["name"], nodeA-->nodeB)."""
    md = sh(DVC, "dag", "--md", cwd=repo)
    names = dict(re.findall(r'(node\d+)\["?([^"\]]+)"?\]', md))
    return {(names[a], names[b]) for a, b in re.findall(r"(node\d+)-->(node\d+)", md)}


def ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


@contextlib.contextmanager
def edited_params(repo, edit):
    """params.yaml of `repo` with `edit` applied, restored after."""
    params = repo / "params.yaml"
    original = params.read_text()
    try:
        p = yaml.safe_load(original)
        edit(p)
        params.write_text(yaml.safe_dump(p))
        yield
    finally:
        params.write_text(original)


def rerun_after(repo, edit) -> set[str]:
    """Stages that `dvc repro` actually runs after `edit` of params.yaml (then restored)."""
    try:
        with edited_params(repo, edit):
            return ran(sh(DVC, "repro", cwd=repo))
    finally:
        sh(DVC, "repro", "-q", cwd=repo)  # back to the original outputs (from the run cache)


def stale_after(repo, edit) -> set[str]:
    """Stages that `dvc status` finds changed after `edit` of params.yaml (then restored): those whose own deps
    changed; the ones downstream re-run as `rerun_after` shows, along the graph (`dag_edges`)."""
    with edited_params(repo, edit):
        return set(json.loads(sh(DVC, "status", "--json", cwd=repo)))


METHODS = ("kd", "at", "nst", "fsp", "fitnets", "crd", "dkd")


def test_student_key_marks_the_student_and_the_distilled_students(repo):
    # the student's recipe is each distillation's: its key marks them all, the teacher's chain not
    stale = stale_after(repo, lambda p: p["student"]["optim"].update(lr=0.02))
    assert stale == {"student"} | {f"distill@{m}" for m in METHODS}
    edges = dag_edges(repo)
    assert {("student", "evaluate@student"), ("evaluate@student", "report")} <= edges
    assert all({(f"distill@{m}", f"evaluate@{m}"), (f"evaluate@{m}", "report")} <= edges for m in METHODS)


def test_one_method_key_reruns_only_that_method(repo):
    # re-run for real: DVC runs what follows a changed output (the student's evaluation, the report, the export)
    stale = rerun_after(repo, lambda p: p["distill"]["at"].update(beta=10.0))
    assert stale == {"distill@at", "evaluate@at", "report", "export"}  # export picks the best student again


def test_teacher_key_marks_the_teacher_alone_and_every_student_reads_its_file(repo):
    # the teacher's key marks its stage alone; every distillation reads its checkpoint, the student's baseline not (so a
    # new teacher re-runs them all, as `rerun_after` shows for a method's key)
    assert stale_after(repo, lambda p: p["teacher"].update(epochs=3)) == {"teacher"}
    edges = dag_edges(repo)
    # (and the report its log)
    assert {b for a, b in edges if a == "teacher"} == {"evaluate@teacher", "report"} | {f"distill@{m}" for m in METHODS}


def test_evaluate_key_marks_the_evaluations_whose_metrics_stay_the_same(repo):
    # its key marks every evaluation and nothing else; at the new batch size an evaluation writes the same bytes, so
    # DVC re-runs nothing after them (the report)
    edit = lambda p: p["evaluate"].update(batch_size=7)  # noqa: E731
    assert stale_after(repo, edit) == {"evaluate@teacher", "evaluate@student"} | {f"evaluate@{m}" for m in METHODS}
    before = {f: (repo / f).read_bytes() for f in ("metrics/kd.json", "plots/kd.csv")}
    with edited_params(repo, edit):
        sh("kdpipe", "evaluate", "kd", cwd=repo)
    assert {f: (repo / f).read_bytes() for f in before} == before
    assert json.loads(sh(DVC, "status", "--json", cwd=repo)) == {}


def test_data_key_reruns_everything(repo):
    assert json.loads(sh(DVC, "status", "--json", cwd=repo)) == {}
    assert stale_after(repo, lambda p: p["data"]["synthetic"].update(seed=1)) == {"data"}  # the rest follows in the DAG
    edges = dag_edges(repo)
    for edge in [("data", "teacher"), ("data", "student"), ("teacher", "evaluate@teacher"),
                 ("student", "evaluate@student"), ("evaluate@teacher", "report"), ("evaluate@student", "report")]:
        assert edge in edges


def test_report_code_edit_never_retrains(repo):
    src = repo / "kdpipe/report.py"
    original = src.read_text()
    try:
        src.write_text(original + "\n# edited\n")
        assert set(json.loads(sh(DVC, "status", "--json", cwd=repo))) == {"report"}
    finally:
        src.write_text(original)


def test_metrics_readable_by_dvc(repo):
    shown = json.loads(sh(DVC, "metrics", "show", "--json", cwd=repo))
    text = json.dumps(shown)
    assert "metrics/teacher.json" in text and "top1_last" in text


def test_hand_runs_and_ad_hoc_runs_leave_the_pipeline_up_to_date(repo):
    # the exact command of a stage, run by hand, reproduces its outputs byte for byte (timings live in
    # untracked logs/NAME.timing.json)
    sh("kdpipe", "distill", "--method", "fitnets", cwd=repo)
    assert json.loads(sh(DVC, "status", "--json", cwd=repo)) == {}
    # an ad-hoc run touches no file the report reads, and its outputs are git-ignored
    sh("kdpipe", "distill", "--method", "kd+at", "--name", "kd_at", cwd=repo)
    sh("kdpipe", "evaluate", "kd_at", cwd=repo)
    sh("kdpipe", "report", "student", "kd_at", cwd=repo)  # an ad-hoc report: reports/adhoc, not the pipeline's
    assert json.loads(sh(DVC, "status", "--json", cwd=repo)) == {}
    adhoc = ["models/kd_at.pt", "logs/kd_at.json", "logs/kd_at.timing.json", "metrics/kd_at.json", "plots/kd_at.csv"]
    assert sh("git", "check-ignore", *adhoc, cwd=repo).split() == adhoc


def test_one_comparison_plot_a_colour_per_run(repo):
    shown = json.loads(sh(DVC, "plots", "show", "--json", "--split", cwd=repo))
    plots = shown.get("data", shown)
    assert set(plots) == {"test_top1"}
    (vega,) = plots["test_top1"]
    encoding = vega["content"]["encoding"]
    assert encoding["color"]["field"] == "filename" and encoding["strokeDash"]["field"] == "rev"
    runs = {row["filename"] for row in vega["anchor_definitions"]["<DVC_METRIC_DATA>"]}
    assert len(runs) == 9  # teacher, student and the seven distilled students: nine colours


def test_teachers_are_shared_through_a_dvc_remote(tmp_path):
    """Machine A trains the teacher and pushes (outputs and run-cache) to a shared remote; machine B,
    a fresh clone, pulls instead of retraining: same bytes, and `dvc repro` there does not run it."""
    a, b, remote = tmp_path / "a", tmp_path / "b", tmp_path / "remote"
    a.mkdir()
    shutil.copytree(ROOT / "kdpipe", a / "kdpipe", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / f, a)
    (a / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    sh("git", "init", "-q", cwd=a)
    sh("git", "config", "user.email", "a@kdpipe.invalid", cwd=a)
    sh("git", "config", "user.name", "a", cwd=a)
    sh(DVC, "init", "-q", cwd=a)
    sh(DVC, "remote", "add", "-d", "shared", str(remote), cwd=a)
    sh(DVC, "repro", "teacher", cwd=a)
    sh("git", "add", "-A", cwd=a)
    sh("git", "commit", "-qm", "teacher", cwd=a)
    sh(DVC, "push", "--run-cache", cwd=a)

    sh("git", "clone", "-q", str(a), str(b), cwd=tmp_path)
    out = sh(DVC, "repro", "--pull", "teacher", cwd=b)
    assert "Running stage 'teacher'" not in out and "Running stage 'data'" not in out, out
    assert (b / "models/teacher.pt").read_bytes() == (a / "models/teacher.pt").read_bytes()
    assert json.loads(sh(DVC, "status", "--json", "teacher", cwd=b)) == {}
