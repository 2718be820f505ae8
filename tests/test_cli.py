"""Every stage through the CLI, in a scratch folder with tiny params."""

import json

from typer.testing import CliRunner

from kdpipe.cli import app

from .conftest import tiny_params, write_params

METRIC_KEYS = {"top1", "top5", "top1_last", "best_epoch", "params_m", "epochs"}  # deterministic: no timings


def invoke(*args):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_stages_end_to_end(workdir):
    invoke("data")
    invoke("teacher")
    invoke("student")
    for name in ("teacher", "student"):
        invoke("evaluate", name)
        m = json.loads((workdir / f"metrics/{name}.json").read_text())
        assert set(m) == METRIC_KEYS
        hist = (workdir / f"plots/{name}.csv").read_text().splitlines()
        assert hist[0].startswith("epoch,") and len(hist) == 1 + m["epochs"]
        best = max(float(row.split(",")[5]) for row in hist[1:])
        assert m["top1"] == round(best, 2) and 1 <= m["best_epoch"] <= m["epochs"] == 2
        assert m["top1_last"] == round(float(hist[-1].split(",")[5]), 2)
        assert m["top5"] == round(float(hist[-1].split(",")[6]), 2)
    assert json.loads((workdir / "metrics/teacher.json").read_text())["params_m"] == 0.18
    out = invoke("report", "teacher", "student")  # ad hoc: never over the pipeline's reports/
    assert not (workdir / "reports/results.md").exists()
    text = (workdir / "reports/adhoc/results.md").read_text()
    assert "| ResNet-14 (teacher) | 0.18 |" in text and "| ResNet-8 (student) | 0.08 |" in text
    assert "Published" not in text  # synthetic data: nothing to compare with
    assert (workdir / "reports/adhoc/accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "ResNet-14" in out


def test_report_compares_with_published_on_cifar(workdir):
    from kdpipe import report

    rows = [{"name": "teacher", "role": "teacher", "model": "resnet56", "params_m": 0.86, "top1": 93.0,
             "top5": 99.7, "top1_last": 92.9}]
    text = report.table(rows, "cifar10")
    assert "| ResNet-56 (teacher) | 0.86 | 93.00 | 99.70 | 92.90 |  | 93.63 / 99.75 |" in text
    assert "71.09 / 91.56" in report.table(rows, "cifar100")


def test_evaluate_rejects_checkpoint_for_other_data(workdir):
    invoke("data")
    invoke("student")
    write_params(workdir / "params.yaml", tiny_params(data={"synthetic": {"num_classes": 5}}))
    invoke("data")
    result = CliRunner().invoke(app, ["evaluate", "student"])
    assert result.exit_code == 1 and "trained on other data" in result.output


def test_missing_inputs_give_one_line_errors(workdir):
    result = CliRunner().invoke(app, ["teacher"])
    assert result.exit_code == 1
    assert result.output.strip() == "error: data/prepared: no prepared data (run `kdpipe data` first)"
    invoke("data")
    result = CliRunner().invoke(app, ["evaluate", "ghost"])
    assert result.exit_code == 1 and result.output.strip() == "error: models/ghost.pt: checkpoint not found"
    result = CliRunner().invoke(app, ["report", "ghost"])
    assert result.exit_code == 1 and "no metrics for ghost" in result.output


def test_bench_json_reports_every_case(workdir):
    out = invoke("bench", "--model", "resnet8", "--teacher", "resnet8", "--batch-size", "8", "--steps", "1",
                 "--warmup", "0", "--repeats", "1", "--workers", "0", "--device", "cpu", "--json")
    report = json.loads(out)
    cases = [r["case"] for r in report["results"]]
    assert cases[:3] == ["train resnet8 (teacher)", "train resnet8 (student)", "resnet8 inference forward"]
    from kdpipe.config import METHODS

    expected = [f"distill {m}" for m in METHODS]
    expected.insert(expected.index("distill crd") + 1, "crd memory bank")  # CRD's memory bank timed alone
    assert [c.split(":")[0] for c in cases[3:]] == expected
    crd = next(r for r in report["results"] if r["case"].startswith("crd memory bank"))
    assert 0 < crd["share_of_crd_step"]
    assert all(r["images_per_s"] > 0 for r in report["results"])
    assert report["results"][0]["speedup"] > 0 and "baseline_images_per_s" in report["results"][1]
    assert report["bf16"] is False and report["channels_last"] is True  # CPU default at native ISA: fp32, channels_last
    assert report["device"].startswith("cpu (")
    result = CliRunner().invoke(app, ["bench", "--model", "resnet9"])
    assert result.exit_code == 2 and "unknown model 'resnet9'" in result.output
    result = CliRunner().invoke(app, ["bench", "--cpu-isa", "avx3"])
    assert result.exit_code == 2 and "cpu_isa: Input should be 'native' or 'avx2' (got 'avx3')" in result.output


def test_bench_says_which_methods_a_pair_does_not_admit(workdir):
    # FSP compares C x C' Gram matrices, so it needs the teacher's widths: N/A across widths, the other methods run
    args = ["bench", "--model", "resnet8", "--teacher", "wrn_16_2", "--methods", "fsp,kd", "--batch-size", "8",
            "--steps", "1", "--warmup", "0", "--repeats", "1", "--workers", "0", "--device", "cpu"]
    fsp, kd = json.loads(invoke(*args, "--json"))["results"][3:]
    assert "fsp needs equal channel counts" in fsp["not_applicable"] and "images_per_s" not in fsp
    assert kd["case"] == "distill kd: wrn_16_2 -> resnet8" and kd["images_per_s"] > 0 and "not_applicable" not in kd
    out = invoke(*args)
    assert "N/A: distill fsp: wrn_16_2 -> resnet8: fsp needs equal channel counts" in out and "N/A: distill kd" not in out


def test_bench_times_the_compiled_step_beside_the_eager_one(workdir, monkeypatch):
    import torch

    seen = []  # torch.compile itself is slow to build on CPU (tests/test_gpu_paths.py runs it): the call is what counts
    monkeypatch.setattr(torch, "compile", lambda m, **options: seen.append(options) or m)
    args = ["bench", "--model", "resnet8", "--teacher", "resnet8", "--methods", "kd", "--batch-size", "8", "--steps", "1",
            "--warmup", "1", "--repeats", "1", "--workers", "0", "--device", "cpu", "--compile", "reduce-overhead"]
    report = json.loads(invoke(*args, "--json"))
    teacher, student, forward, kd = report["results"]
    for row in (teacher, student):  # the training cases: baseline, kdpipe and kdpipe compiled, side by side
        assert row["compiled_images_per_s"] > 0 and row["compile_seconds"] >= 0
        assert row["compiled_speedup"] == round(row["compiled_images_per_s"] / row["baseline_images_per_s"], 2)
    assert "compiled_images_per_s" not in forward and "compiled_images_per_s" not in kd
    assert report["compile"] == "reduce-overhead" and seen == [{"dynamic": False, "mode": "reduce-overhead"}] * 2
    assert invoke(*args).strip().splitlines()[-1].count("┴") == 7  # the table: its 3 columns beside the 5
    for wrong in ("fast", "true"):  # the option's own words (runtime.compile's `true` is `on` here)
        result = CliRunner().invoke(app, args[:-1] + [wrong])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
        assert f"--compile '{wrong}': must be one of off, on, reduce-overhead" in result.output


def test_timings_stay_out_of_tracked_outputs(workdir):
    # a hand re-run of a stage must reproduce its DVC outputs byte for byte: wall-clock time lives in
    # logs/NAME.timing.json (not a DVC output), the checkpoint and logs/NAME.json are deterministic
    invoke("data")
    invoke("student")
    first = {f: (workdir / f).read_bytes() for f in ("models/student.pt", "logs/student.json")}
    timing = json.loads((workdir / "logs/student.timing.json").read_text())
    assert timing["seconds"] > 0 and timing["images_per_s"] > 0
    invoke("student")
    assert {f: (workdir / f).read_bytes() for f in first} == first
    log = json.loads(first["logs/student.json"])
    assert "seconds" not in log and log["role"] == "student"


def test_checkpoint_records_its_input_normalisation(workdir):
    import torch

    invoke("data")
    invoke("student")
    manifest = json.loads((workdir / "data/prepared/manifest.json").read_text())
    ckpt = torch.load(workdir / "models/student.pt", weights_only=True)
    assert ckpt["normalization"] == {"mean": manifest["mean"], "std": manifest["std"]}


def test_unwritable_output_folder_fails_before_training_in_one_line(workdir):
    invoke("data")
    (workdir / "models").write_text("a file where the models folder should be")
    result = CliRunner().invoke(app, ["student"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("error: models: cannot write outputs there")
    assert not (workdir / "logs").exists()  # failed before the first epoch: nothing written


def test_os_error_while_writing_is_one_line(workdir, monkeypatch):
    from kdpipe import checkpoint

    invoke("data")

    def full_disk(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "atomic_write", full_disk)
    result = CliRunner().invoke(app, ["student"])
    assert result.exit_code == 1  # the first write (epoch 1's resume state) fails: one line, no traceback
    errors = [line for line in result.output.splitlines() if not line.startswith("student: epoch")]
    assert errors == ["error: models/student.pt.resume: No space left on device"]
    assert not (workdir / "models/student.pt").exists()


def test_atomic_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    from kdpipe import checkpoint

    target = tmp_path / "out.json"
    monkeypatch.setattr(checkpoint.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    import pytest

    with pytest.raises(OSError):
        checkpoint.atomic_write(target, "{}")
    assert list(tmp_path.iterdir()) == []


def test_version_and_report_without_names(workdir):
    from importlib.metadata import version

    assert invoke("--version").strip() == f"kdpipe {version('kdpipe')}"
    invoke("data")
    result = CliRunner().invoke(app, ["report"])
    assert result.exit_code == 2 and "runs with metrics: none" in result.output
    invoke("student")
    invoke("evaluate", "student")
    result = CliRunner().invoke(app, ["report"])
    assert result.exit_code == 2 and "runs with metrics: student" in result.output


def test_a_cifar_run_never_imports_torchvision(workdir):
    # importing torchvision costs each process ~2 s (it imports torch._dynamo, as a training process's optimiser
    # does anyway): kdpipe imports it only to resize, RandAugment or build a tv/ model, so no stage of a run on
    # images stored at their size (the synthetic set, pad-crop-flip) imports it; MLKD (RandAugment) shows that the
    # lazy import works where it is needed
    import subprocess
    import sys

    def run(*commands) -> list[str]:
        script = ("import sys\nfrom typer.testing import CliRunner\nfrom kdpipe.cli import app\n"
                  f"for args in {[c.split() for c in commands]}:\n"
                  "    r = CliRunner().invoke(app, args)\n"
                  "    assert r.exit_code == 0, (r.output, r.exception)\n"
                  "    print(args[0], 'torchvision' in sys.modules)\n")
        out = subprocess.run([sys.executable, "-c", script], cwd=workdir, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    assert run("data", "teacher", "distill -m kd -m crd") == ["data False", "teacher False", "distill False"]
    assert run("evaluate kd", "report kd", "distill -m mlkd") == ["evaluate False", "report False", "distill True"]
