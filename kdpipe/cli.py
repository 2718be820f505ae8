"""The `kdpipe` command line: one Typer command per pipeline stage, parameters from params.yaml.

Outputs follow one naming rule, so DVC stages and users agree on paths: a run called NAME writes
models/NAME.pt (checkpoint), logs/NAME.json (timings), metrics/NAME.json and plots/NAME.csv.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import config
from .config import ParamsError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Teacher -> student knowledge distillation, driven by params.yaml.")

def _version(value: bool):
    if value:
        from importlib.metadata import version

        typer.echo(f"kdpipe {version('kdpipe')}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print kdpipe's version and exit")):
    """Teacher -> student knowledge distillation, driven by params.yaml."""


ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params file to read")
DataOpt = typer.Option(Path("data/prepared"), "--data", help="prepared data folder (output of `kdpipe data`)")


def fail(message: str, code: int = 1):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load(params: Path, *require: str) -> config.Params:
    try:
        return config.load_params(params, require)
    except ParamsError as e:
        for line in e.lines:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2)


def require_metrics(names: list[str]) -> None:
    """Every run named must have been evaluated (metrics/NAME.json), else one line naming the missing ones."""
    missing = [n for n in names if not Path(f"metrics/{n}.json").is_file()]
    if missing:
        fail(f"no metrics for {', '.join(missing)} (run `kdpipe evaluate NAME` first)")


def code_check(kind: str, methods: Optional[list[str]] = None) -> None:
    """In a `kdpipe init` project: the installed kdpipe is the code kdpipe-code.yaml records for this stage."""
    if Path("kdpipe-code.yaml").is_file():  # elsewhere (the quickstart, the pipelines) nothing to check
        from . import project

        project.check(kind, methods)


def guarded(fn):
    """Turn kdpipe's own errors into one clear line and a non-zero exit, not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except config.UsageError as e:
            fail(str(e), 2)
        except config.Error as e:
            fail(str(e))
        except ParamsError as e:
            for line in e.lines:
                typer.echo(f"error: {line}", err=True)
            raise typer.Exit(2)
        except OSError as e:  # e.g. a full disk or a read-only folder while writing outputs
            where = f"{e.filename}: " if e.filename else ""
            fail(f"{where}{e.strerror or e}")
        except KeyboardInterrupt:
            typer.echo("interrupted: re-run the same command to resume from the last finished epoch", err=True)
            raise typer.Exit(130)

    return wrapper


@app.command()
@guarded
def data(params: Path = ParamsOpt, out: Path = typer.Option(Path("data/prepared"), help="output folder"),
         raw: Path = typer.Option(Path("data/raw"), help="where downloaded archives are kept")):
    """Download CIFAR (md5-checked), read an image folder, or draw the synthetic set; write compact uint8 arrays."""
    from .prepare import prepare

    p = load(params, "data")
    code_check("data")
    manifest = prepare(p.data, out, raw)
    typer.echo(f"{manifest.dataset}: {manifest.train_size} train / {manifest.test_size} test images, "
               f"{manifest.num_classes} classes -> {out}")


ModelOpt = typer.Option(None, "--model", help="override the section's model (the full pipelines' matrix uses this)")
SeedOpt = typer.Option(None, "--seed", help="override the section's seed")
SectionOpt = typer.Option(None, "--section", help="params section to train with (the pipelines' `table`)")


def _train(role: str, section: Optional[str], name: str, params: Path, data_dir: Path, model: Optional[str],
           seed: Optional[int]):
    from . import runs

    section = section or role
    if section not in config.TRAIN_SECTIONS:
        fail(f"--section: {section!r} is not a training section ({', '.join(config.TRAIN_SECTIONS)})", 2)
    p = load(params, section)
    code_check("train")
    runs.train(section, runs.with_overrides(getattr(p, section), model, seed), name, data_dir)


@app.command()
@guarded
def teacher(params: Path = ParamsOpt, data_dir: Path = DataOpt, name: str = typer.Option("teacher", help="run name"),
            model: Optional[str] = ModelOpt, seed: Optional[int] = SeedOpt, section: Optional[str] = SectionOpt):
    """Train a model from scratch with cross-entropy (params section `teacher`, or --section)."""
    _train("teacher", section, name, params, data_dir, model, seed)


@app.command()
@guarded
def student(params: Path = ParamsOpt, data_dir: Path = DataOpt, name: str = typer.Option("student", help="run name"),
            model: Optional[str] = ModelOpt, seed: Optional[int] = SeedOpt):
    """Train the student baseline with plain cross-entropy (params section `student`)."""
    _train("student", None, name, params, data_dir, model, seed)


@app.command()
@guarded
def distill(method: list[str] = typer.Option(..., "--method", "-m", help="one of: " + ", ".join(config.METHODS)
                                             + "; or a combination like kd+at; a variant of params' `variants` ends it, "
                                             "e.g. kd+ls. Repeated (-m kd -m dkd): one student each, trained together "
                                             "on one data pass and one teacher forward per batch, each as it would alone"),
            params: Path = ParamsOpt, data_dir: Path = DataOpt,
            teacher: Path = typer.Option(Path("models/teacher.pt"), help="teacher checkpoint (output of `kdpipe teacher`)"),
            name: Optional[str] = typer.Option(None, help="run name (default: the method); with several --method, a "
                                               "pattern in which {method} stands for each, e.g. {method}-s0"),
            model: Optional[str] = ModelOpt, seed: Optional[int] = SeedOpt,
            na_ok: bool = typer.Option(False, "--na-ok", help="where the method cannot run on this teacher/student "
                                       "pair (FSP across widths), record 'not applicable' and exit 0 (the pipelines' grid)")):
    """Distil the teacher into the student (params `student` + `distill.<method>`)."""
    from . import runs

    p = load(params, "student", "distill")
    if name and len(method) > 1 and "{method}" not in name:
        raise ParamsError([f"--name {name!r} names one student, but --method is given {len(method)} times "
                           "(a pattern with {method} names each)"])
    repeated = sorted({m for m in method if method.count(m) > 1})
    if repeated:
        raise ParamsError([f"--method {repeated[0]!r} is given more than once"])
    students = []
    for spec in method:
        methods, variant = config.parse_run(spec, p.variants)
        code_check("distill", methods)
        recipe = p.varied(variant, methods).student_for(methods)
        student_name = name.replace("{method}", spec) if name else spec
        students.append(runs.Student(methods, variant, student_name, runs.with_overrides(recipe, model, seed)))
    for student_name, reason in runs.distill(students, p, teacher, data_dir, na_ok).items():
        typer.echo(f"{student_name}: not applicable: {reason}", err=True)


@app.command("wkd-cost")
@guarded
def wkd_cost(teacher: Path = typer.Option(Path("models/teacher.pt"), help="teacher checkpoint"),
             params: Path = ParamsOpt, data_dir: Path = DataOpt,
             imported: Optional[Path] = typer.Option(None, "--import", help="the authors' file for this (published) "
                                                    "teacher instead, e.g. WKD's wkd_cost_matrix/cifar100/resnet32x4/"
                                                    "linear_cka.pth")):
    """WKD's CKA class cost of a teacher on the training data (params `distill.wkd.cka_features`, `evaluate`'s
    device and batch): writes models/NAME.wkd-cost.pt beside the teacher, which `distill.wkd.cost: cka` reads."""
    from . import runtime
    from .distill import wkd

    p = load(params, "evaluate")
    code_check("wkd-cost")
    runtime.pin_cpu(p.evaluate)
    out = wkd.write_cost(teacher, data_dir, p.evaluate, p.distill.wkd.cka_features, imported)
    typer.echo(f"{out}: WKD's class cost of {teacher}")


@app.command("evaluate")
@guarded
def evaluate_cmd(name: str = typer.Argument(..., help="run name: evaluates models/NAME.pt"),
                 params: Path = ParamsOpt, data_dir: Path = DataOpt):
    """Test a trained model; write metrics/NAME.json and plots/NAME.csv."""
    from . import evaluate, runtime
    from .checkpoint import model_path

    p = load(params, "evaluate")
    code_check("evaluate")
    runtime.pin_cpu(p.evaluate)
    m = evaluate.run(name, model_path(name), data_dir,
                     Path(f"metrics/{name}.json"), Path(f"plots/{name}.csv"), p.evaluate)
    if "not_applicable" in m:
        typer.echo(f"{name}: not applicable ({m['not_applicable']})")
        return
    top5 = f", top5 {m['top5']:.2f}%" if "top5" in m else ""  # none for 5 classes or fewer
    typer.echo(f"{name}: top1 {m['top1']:.2f}% (epoch {m['best_epoch']}){top5}, last top1 {m['top1_last']:.2f}%")
    if "warning" in m:
        typer.echo(f"warning: {name}: {m['warning']}", err=True)


@app.command()
@guarded
def report(names: Optional[list[str]] = typer.Argument(None, help="run names, in table order; none: the "
                                                         "full pipelines' grid (models, published, pairs, methods, seeds)"),
           params: Path = ParamsOpt, data_dir: Path = DataOpt,
           out: Optional[Path] = typer.Option(None, help="output folder (default: reports for the pipelines' grid, "
                                                         "reports/adhoc for named runs, so an ad-hoc report never "
                                                         "overwrites the pipeline's)")):
    """Write results.md (published-format table) and accuracy.png."""
    from . import report as report_mod
    from .data import read_manifest

    code_check("report")
    manifest = read_manifest(data_dir)
    if not names:
        p = load(params)
        if not p.models and not p.published and not p.table_models:
            found = sorted(f.stem for f in Path("metrics").glob("*.json"))
            fail("no run names given and no `table_models`/`models`/`published` grid in params; runs with metrics: "
                 + (", ".join(found) if found else "none (run `kdpipe evaluate NAME` first)"), 2)
        typer.echo(report_mod.grid(p, manifest, Path("metrics"), Path("plots"), out or Path("reports")))
        return
    require_metrics(names)
    text = report_mod.write(names, manifest, Path("metrics"), Path("logs"), Path("plots"), out or Path("reports/adhoc"))
    typer.echo(text)


def parse_triple(option: str, value: Optional[str]) -> Optional[list[float]]:
    if value is None:
        return None
    try:
        triple = [float(v) for v in value.split(",")]
    except ValueError:
        triple = []
    if len(triple) != 3:
        fail(f"{option}: expected three comma-separated numbers (R,G,B), got {value!r}", 2)
    return triple


@app.command("import-teacher")
@guarded
def import_teacher_cmd(path: Path = typer.Argument(..., help="RepDistiller/mdistiller checkpoint (ckpt_epoch_240.pth) "
                                                             "or a bare state dict; for tv/ and timm/ models also a "
                                                             "weights name (IMAGENET1K_V1, pretrained)"),
                       model: str = typer.Option(..., "--model", help="model name, e.g. resnet32x4, tv/resnet50"),
                       name: str = typer.Option(..., "--name", help="run name: writes models/NAME.pt"),
                       data_dir: Optional[Path] = typer.Option(None, "--data", help="prepared data the teacher is for: "
                                                               "its dataset name and class count (the pipelines)"),
                       num_classes: Optional[int] = typer.Option(None, "--num-classes", min=2,
                                                                 help="classes of the checkpoint (without --data; "
                                                                      "implied by --dataset cifar10/cifar100)"),
                       dataset: Optional[str] = typer.Option(None, help="dataset the teacher was trained on, e.g. "
                                                                        "cifar100 (without --data)"),
                       mean: Optional[str] = typer.Option(None, help="input mean R,G,B (default: the reference's "
                                                                     "for the dataset, else the prepared data's)"),
                       std: Optional[str] = typer.Option(None, help="input std R,G,B (as --mean)")):
    """Import a published teacher (RepDistiller / mdistiller checkpoint, or a tv/ / timm/ state dict) as models/NAME.pt."""
    from . import models
    from .checkpoint import model_path
    from .import_teacher import import_teacher, target

    try:
        models.check_name(model)
    except ValueError as e:
        fail(f"--model: {e}", 2)
    mean_v, std_v = parse_triple("--mean", mean), parse_triple("--std", std)
    if (mean_v is None) != (std_v is None):
        fail("--mean and --std go together", 2)
    norm = {"mean": mean_v, "std": std_v} if mean_v else None
    dataset, num_classes, norm = target(data_dir, dataset, num_classes, norm)
    out = model_path(name)
    ckpt = import_teacher(path, model, num_classes, out, dataset, norm)
    src = ckpt["meta"]["imported"]
    acc = f", source accuracy {src['accuracy']:.2f}%" if "accuracy" in src else ""
    typer.echo(f"{path} -> {out}: {model}, {num_classes} classes, {ckpt['params_m']}M params, "
               f"sha256 {src['sha256'][:12]}{acc}")


@app.command("export")
@guarded
def export_cmd(names: list[str] = typer.Argument(..., help="run name (models/NAME.pt); with --best, several"),
               fmt: str = typer.Option("onnx", "--format", help="onnx or torchscript"),
               opset: Optional[int] = typer.Option(None, help="ONNX opset (default: the exporter's)"),
               best: bool = typer.Option(False, "--best", help="export the run with the highest metrics top1_last "
                                         "(the accuracy of the weights exported: the last epoch's)"),
               out: Optional[Path] = typer.Option(None, help="output file (default models/NAME.onnx)"),
               data_dir: Path = DataOpt):
    """Export a trained student (ONNX or TorchScript) and check it against PyTorch on test images."""
    from .checkpoint import model_path
    from .export import export, last_top1

    code_check("export")
    if fmt not in ("onnx", "torchscript"):
        fail(f"--format: {fmt!r} is not onnx or torchscript", 2)
    if len(names) > 1 and not best:
        fail("several names need --best (export the one with the highest top1_last)", 2)
    if best:
        require_metrics(names)
    top1 = last_top1(names, Path("metrics"))
    name = max(names, key=lambda n: top1.get(n, float("-inf"))) if best else names[0]  # the first of equals
    suffix = ".onnx" if fmt == "onnx" else ".torchscript.pt"
    out = out or model_path(name).with_suffix(suffix)
    r = export(model_path(name), out, data_dir, fmt, opset, top1=top1.get(name))
    chosen = f" (highest last-epoch top1 {top1[name]:.2f}% of {len(names)})" if best else ""
    typer.echo(f"{name}{chosen} -> {out}: max |logit difference| {r['max_abs_diff']:.2e}, top-1 agreement "
               f"{r['top1_agreement']:.2f}% on {r['images']} test images")


@app.command()
@guarded
def quantize(name: str = typer.Argument(..., help="run name: quantizes models/NAME.onnx (output of `kdpipe export`)"),
             params: Path = ParamsOpt, data_dir: Path = DataOpt):
    """Post-training static INT8 (onnxruntime, QDQ) of models/NAME.onnx: models/NAME.int8.onnx, metrics/NAME.int8.json."""
    from . import quantize as quantize_mod

    p = load(params)
    code_check("quantize")
    m = quantize_mod.quantize(quantize_mod.onnx_path(name), Path(f"models/{name}.int8.onnx"),
                              Path(f"metrics/{name}.int8.json"), data_dir, p.quantize)
    typer.echo(f"{name} -> models/{name}.int8.onnx: top1 {m['top1']:.2f}% (fp32 ONNX {m['fp32_top1']:.2f}%, "
               f"drop {m['top1_drop']:+.2f}), {m['calibration_images']} calibration images")


@app.command()
@guarded
def qat(name: str = typer.Argument(..., help="a distilled student: models/NAME.pt, exported as models/NAME.onnx"),
        params: Path = ParamsOpt, data_dir: Path = DataOpt,
        teacher: Path = typer.Option(Path("models/teacher.pt"), help="teacher checkpoint (output of `kdpipe teacher`)")):
    """Quantization-aware fine-tuning against the teacher (params `qat`, `distill.kd`), INT8 as `quantize` makes it:
    models/NAME.qat.onnx, metrics/NAME.qat.json, logs/NAME.qat.json."""
    from .qat import qat as qat_run

    p = load(params, "student")
    code_check("qat")
    m = qat_run(name, p, teacher, data_dir)
    typer.echo(f"{name} -> models/{name}.qat.onnx: top1 {m['top1']:.2f}% (fp32 ONNX {m['fp32_top1']:.2f}%, "
               f"drop {m['top1_drop']:+.2f}) after {p.qat.epochs} epochs of quantization-aware training")


@app.command()
@guarded
def measure(names: list[str] = typer.Argument(..., help="model files models/NAME.onnx, e.g. student kd kd.int8"),
            params: Path = ParamsOpt, data_dir: Path = DataOpt,
            out: Path = typer.Option(Path("metrics/measure.json"), help="output file (plots/pareto.csv is written "
                                                                         "too)")):
    """CPU latency (batch 1, p50/p95), images/s, size, params and MACs of ONNX models, with their Top-1."""
    from . import measure as measure_mod

    p = load(params)
    code_check("measure")
    r = measure_mod.measure(names, data_dir, Path("metrics"), out, Path("plots/pareto.csv"), p.measure)
    typer.echo("; ".join(f"{n}: {r[n]['latency_ms_p50']:.2f} ms p50, top1 {r[n]['top1']:.2f}%" for n in names)
               + f" -> {out}")


@app.command()
@guarded
def bench(model: str = typer.Option("resnet20", help="student model"),
          teacher: str = typer.Option("resnet56", help="teacher model"),
          batch_size: int = typer.Option(128, min=2), steps: int = typer.Option(10, min=1, help="timed steps per repeat"),
          warmup: int = typer.Option(3, min=0), repeats: int = typer.Option(3, min=1),
          workers: int = typer.Option(2, min=0, help="DataLoader workers of the baseline"),
          device: str = typer.Option("auto"), methods: str = typer.Option(",".join(config.METHODS)),
          channels_last: str = typer.Option("auto", help="kdpipe's memory format: auto | on | off (runtime.channels_last)"),
          cpu_isa: str = typer.Option("native", help="native | avx2: pin the CPU kernels as runtime.cpu_isa does"),
          compile: str = typer.Option("off", help="torch.compile kdpipe's models: off | on | reduce-overhead (CUDA "
                                                  "graphs on CUDA), as runtime.compile"),
          images: int = typer.Option(4096, min=2, help="training images (CRD's memory bank has a row per image: "
                                                       "50000 for CIFAR)"),
          as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")):
    """Benchmark kdpipe's engine against a peer-style DataLoader baseline, side by side."""
    import json

    from . import bench as bench_mod
    from . import models as models_mod

    for m in (model, teacher):
        try:
            models_mod.check_name(m)
        except ValueError as e:
            fail(str(e), 2)
    chosen = tuple(m for m in methods.split(",") if m)
    config.parse_methods("+".join(chosen)) if chosen else None
    modes = {"off": False, "on": True, "reduce-overhead": "reduce-overhead"}
    if compile not in modes:
        fail(f"--compile {compile!r}: must be one of {', '.join(modes)}", 2)
    runtime = config.validate({"device": device, "channels_last": channels_last, "cpu_isa": cpu_isa,
                                "compile": modes[compile]}, config.Runtime)
    out = bench_mod.run(model, teacher, batch_size, steps, warmup, repeats, workers, runtime, chosen, images)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    bench_mod.print_table(out, batch_size, repeats, steps)


@app.command()
@guarded
def init(folder: Path = typer.Argument(..., help="the project's folder (created if absent)"),
         data: Optional[Path] = typer.Option(None, help="your image folder, train/<class>/* and test/<class>/* "
                                                       "(default: the synthetic set, to try the pipeline)"),
         teacher: str = typer.Option("tv/resnet50", help="teacher model (docs/models.md)"),
         student: str = typer.Option("tv/resnet18", help="student model"),
         image_size: int = typer.Option(224, "--image-size", min=8, help="the side the models see"),
         methods: str = typer.Option("kd,dkd", help="distillation methods, comma-separated: "
                                                    + ", ".join(config.METHODS)),
         epochs: int = typer.Option(10, min=1, help="training epochs of each run"),
         qat: str = typer.Option("", "--qat", help="students also made INT8 by quantization-aware fine-tuning against "
                                 "the teacher (`kdpipe qat`), comma-separated: student and/or --methods, e.g. kd"),
         force: bool = typer.Option(False, "--force", help="overwrite the files of an existing project")):
    """Write a DVC project of your own: data, teacher, student, distillation, evaluation, export, INT8, measure, report."""
    from . import project

    chosen = [m for m in methods.split(",") if m]
    for m in chosen:
        if len(config.parse_methods(m)) > 1:  # validates the names too
            fail(f"--methods: {m!r}: a project's rows are single methods (comma-separated: "
                 f"{m.replace('+', ',')}); train the combination in the project with `kdpipe distill -m {m}`", 2)
    if not chosen or len(set(chosen)) != len(chosen):
        fail(f"--methods: {methods!r}: name each method once", 2)
    quantized = [s for s in qat.split(",") if s]
    unknown = [s for s in quantized if s not in ("student", *chosen)]
    if unknown or len(set(quantized)) != len(quantized):
        fail(f"--qat: {qat!r}: name each student once, among: student, {', '.join(chosen)}", 2)
    if data is not None:
        from .prepare import list_folder

        if not data.is_dir():
            fail(f"--data: {data} is not a folder", 2)
        list_folder(data, ("train", "test"))  # the layout, before anything is written (a val/ folder: a hint)
    size = image_size if data is not None else 32  # the synthetic set's images are 32 px
    done = project.init(folder, project.data_path(data, folder), teacher, student, size, chosen, epochs, force,
                        quantized)
    typer.echo(f"{folder}: params.yaml, dvc.yaml, kdpipe-code.yaml, README.md written"
               + (f" ({', '.join(done)})" if done else "") + f"; next: cd {folder} && dvc repro")


@app.command()
@guarded
def sync():
    """Rewrite kdpipe-code.yaml from the installed kdpipe (after an upgrade): `dvc repro` re-runs what changed."""
    from . import project

    if not Path(project.CODE_FILE).is_file():
        fail(f"no {project.CODE_FILE} here: run `kdpipe sync` in a project written by `kdpipe init`")
    changed = project.sync()
    typer.echo(f"{project.CODE_FILE}: " + (f"code changed for {', '.join(changed)}" if changed else "unchanged"))


def main():
    app()


if __name__ == "__main__":
    main()
