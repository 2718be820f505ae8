"""`kdpipe init`: a DVC project of one's own, and the code its stages depend on (`kdpipe sync`).

A project lives outside this repository, with kdpipe installed by pip, so its stages cannot depend on kdpipe's
source files by path (the quickstart's `../kdpipe/engine.py`): the installed files sit at another place on each
machine. Instead, `kdpipe-code.yaml` in the project holds, per kind of stage, a hash of the installed kdpipe files
that decide its results (`CODE`), and each stage depends on its own key of it as a DVC param. `kdpipe sync`
rewrites the file from the installed package: after an upgrade that changed, say, DKD's loss, only the
`distill.dkd` key changes and `dvc repro` re-runs `distill@dkd` and what follows it; an unchanged package writes
the same bytes, so nothing else is ever marked stale. A stage command run with a kdpipe whose code differs from
what the file says refuses to start (`check`), so a result never comes from code its record does not name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from . import config

CODE_FILE = "kdpipe-code.yaml"

# The package files (relative to kdpipe/) each kind of stage imports or reads: tools/stage_deps.py checks them
# against the files the stages of a project really imported (CI's `kdpipe init` run). models/*: the model registry
# and every family file, torchvision's and timm's included (the params may name any of them). Every stage validates
# the whole params file, so it imports every schema: config/deploy.py (`quantize`, `qat` and `measure`) and each
# method's file (its schema sits beside its loss) with the shared method files; its results depend on those of its
# own kind and methods alone (VALIDATION_ONLY: tests/test_project.py checks it is what validation imports).
CONFIG = [f"config/{f}.py" for f in ("__init__", "base", "data", "distill", "errors", "load", "params", "train")]
MODELS = [*CONFIG, "data.py", "models/*.py"]
DEPLOY_SCHEMA = "config/deploy.py"
METHODS_SHARED = ["losses.py", "distill/__init__.py", "distill/base.py", "distill/functional.py"]
VALIDATION_ONLY = {DEPLOY_SCHEMA, *METHODS_SHARED, *(f"distill/{m}.py" for m in config.METHODS)}
LOADING = ["checkpoint.py", "runtime.py", "augment.py", "sources.py"]
LOOP = [*LOADING, "engine.py", "progress.py", "losses.py"]
CODE = {
    "data": [*MODELS, "prepare.py", "synthetic.py"],
    "train": [*MODELS, *LOOP, "runs.py"],
    "distill": [*MODELS, *LOOP, "runs.py", *METHODS_SHARED],
    "evaluate": [*MODELS, *LOOP, "evaluate.py"],
    "wkd-cost": [*MODELS, *LOOP, "runs.py", *METHODS_SHARED, "distill/wkd.py"],
    "export": [*MODELS, *LOADING, "export.py"],
    "quantize": [*MODELS, *LOADING, DEPLOY_SCHEMA, "quantize.py"],
    "qat": [*MODELS, *LOOP, "runs.py", *METHODS_SHARED, "distill/kd.py",
            DEPLOY_SCHEMA, "export.py", "quantize.py", "qat.py"],
    "measure": [*MODELS, *LOADING, DEPLOY_SCHEMA, "quantize.py", "names.py", "measure.py"],
    "report": [*MODELS, "report.py", "names.py", "plots.py", "published.py", "published.yaml"],
}
# The installed packages whose version can change a kind of stage's results (decoding, kernels, the exporter,
# onnxruntime's quantizer and runtime): part of its hash, so an upgrade re-runs what it may change.
VERSIONS = {"data": ["torch", "torchvision", "pillow"], "train": ["torch", "torchvision"],
            "distill": ["torch", "torchvision"], "evaluate": ["torch", "torchvision"], "wkd-cost": ["torch", "torchvision"],
            "export": ["torch", "torchvision", "onnx", "onnxscript"], "quantize": ["torch", "onnx", "onnxruntime"],
            "qat": ["torch", "torchvision", "onnx", "onnxscript", "onnxruntime"],
            "measure": ["torch", "onnx", "onnxruntime"], "report": ["matplotlib"]}
# the command each kind of stage runs (cli.py calls `check` with it)
COMMAND_CODE = {"data": "data", "teacher": "train", "student": "train", "evaluate": "evaluate",
                "export": "export", "quantize": "quantize", "qat": "qat", "measure": "measure", "report": "report"}


class ProjectError(config.Error):
    pass


def package_root() -> Path:
    return Path(__file__).resolve().parent


def code_files(kind: str, method: str | None = None) -> list[str]:
    """The files (relative to the package) a kind of stage depends on; `distill` per method."""
    root = package_root()
    files = {str(p.relative_to(root)) for pattern in CODE[kind] for p in root.glob(pattern)}
    if method:
        files.add(f"distill/{method}.py")
    return sorted(files)


def code_text_of(path: Path) -> bytes:
    """What of a file can change results: a Python file's syntax tree without its docstrings (comments are not in
    it), so editing a comment or a docstring re-runs nothing; another file's bytes. (The tree's printed form is
    Python's: another Python version may print it otherwise, and then re-runs the stages.)"""
    stat = path.stat()
    return _code_text(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _code_text(path: Path, mtime_ns: int, size: int) -> bytes:  # once per file version: every kind shares files
    if path.suffix != ".py":
        return path.read_bytes()
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False).encode()


def package_versions(kind: str) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in VERSIONS[kind]:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} absent")
    return out


def code_hash(kind: str, method: str | None = None) -> str:
    h = hashlib.sha256()
    for rel in code_files(kind, method):
        h.update(rel.encode() + b"\0" + code_text_of(package_root() / rel) + b"\0")
    for line in package_versions(kind):
        h.update(line.encode() + b"\0")
    return h.hexdigest()[:16]


def code_record() -> dict:
    """What `kdpipe-code.yaml` holds: the kdpipe version (for people) and one hash per kind of stage."""
    from importlib.metadata import version

    record = {"version": version("kdpipe")}
    for kind in CODE:
        if kind == "distill":
            record[kind] = {m: code_hash(kind, m) for m in config.METHODS}
        else:
            record[kind] = code_hash(kind)
    return record


def code_text() -> str:
    return ("# The installed kdpipe's code, per kind of stage (written by `kdpipe init` and `kdpipe sync`; do not edit).\n"
            "# Each stage depends on its key: after upgrading kdpipe, `kdpipe sync` then `dvc repro` re-runs exactly\n"
            "# the stages whose code changed. A stage run by a kdpipe that differs from this record refuses to start.\n"
            + yaml.safe_dump(code_record(), sort_keys=False))


def sync(project: Path = Path(".")) -> list[str]:
    """Rewrite the project's kdpipe-code.yaml from the installed package; the keys whose hash changed."""
    path = project / CODE_FILE
    old = yaml.safe_load(path.read_text()) if path.is_file() else {}
    text = code_text()
    new = yaml.safe_load(text)
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    changed = [k for k in new if k != "version" and not isinstance(new[k], dict) and old.get(k) != new[k]]
    changed += [f"{k}.{m}" for k in new if isinstance(new[k], dict)
                for m in new[k] if (old.get(k) or {}).get(m) != new[k][m]]
    return changed


def check(kind: str, methods: list[str] | None = None, project: Path = Path(".")) -> None:
    """In a project with kdpipe-code.yaml: the installed code of this stage is the code the file records."""
    path = project / CODE_FILE
    if not path.is_file():
        return  # not a `kdpipe init` project (the quickstart and pipelines depend on the source files by path)
    try:
        recorded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ProjectError(f"{path}: not valid YAML; run `kdpipe sync` to rewrite it") from None
    keys = [(f"{kind}.{m}", (recorded.get(kind) or {}).get(m), code_hash(kind, m)) for m in methods] if methods \
        else [(kind, recorded.get(kind), code_hash(kind))]
    for key, was, now in keys:
        if was != now:
            raise ProjectError(f"{path}: the installed kdpipe's code for `{key}` differs from the record (written by "
                               f"kdpipe {recorded.get('version', '?')}): run `kdpipe sync`, then `dvc repro`")


# ---- kdpipe init ----------------------------------------------------------------------------------------------
CIFAR_EPOCHS = 240  # the epochs the methods' epoch counts (warm-up, init stage) are set for


def _flow(value) -> str:
    """`value` as one line of YAML."""
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    if value is None:
        return "null"
    return str(value) if yaml.safe_load(str(value)) == value else json.dumps(value)


def _default_weights(model: str) -> str | None:
    """torchvision's recommended weights for a `tv/` model (what fine-tuning starts from), timm's pretrained tag,
    None for kdpipe's CIFAR models."""
    if model.startswith("tv/"):
        return "DEFAULT"
    return "pretrained" if model.startswith("timm/") else None


def _method_params(method: str, epochs: int) -> dict:
    """A method's keys with its defaults, its epoch counts (`config.epoch_keys`: warm-ups, init stages, decays)
    scaled from the CIFAR recipe's 240 epochs to `epochs` (DKD's 20-epoch warm-up is 1 epoch of 10)."""
    cfg = getattr(config.Distill(), method)
    values = cfg.model_dump()
    values["train"] = values.pop("train")  # last, after the method's own keys (a recipe override, rarely set)
    for key in config.epoch_keys(type(cfg)):
        if values[key]:
            values[key] = max(1, round(values[key] * epochs / CIFAR_EPOCHS))
    try:
        type(cfg).model_validate(values)
    except ValidationError as e:
        raise ProjectError(f"--epochs {epochs}: {method}'s epoch counts do not scale to it "
                           f"({e.errors()[0]['msg']}); choose more epochs") from None
    return values


def _train_section(model: str, weights: str | None, epochs: int) -> list[str]:
    runtime = config.Runtime(workers="auto").model_dump()
    runtime = {k: runtime[k] for k in ("device", "bf16", "channels_last", "compile", "sync_bn", "cpu_isa", "cpu_threads",
                                       "workers")}  # the order docs/params.md explains them in
    return [
        "  recipe: null",
        f"  model: {model}",
        f"  weights: {_flow(weights)}" + ("          # where the fine-tuning starts (docs/models.md)" if weights else ""),
        "  seed: 0",
        f"  epochs: {epochs}",
        "  batch_size: 64",
        "  optim: " + _flow(config.Optim(lr=0.01, weight_decay=1e-4).model_dump()) + "   # fine-tuning: a small lr",
        "  schedule: " + _flow(config.Schedule(warmup_epochs=1 if epochs > 1 else 0).model_dump()),
        "  runtime: " + _flow(runtime),
    ]


def params_text(data: str | None, teacher: str, student: str, image_size: int, methods: list[str],
                epochs: int = 10, qat: list[str] = ()) -> str:
    folder = data is not None
    distilled = [*methods, *(["kd"] if qat and "kd" not in methods else [])]  # QAT's loss is KD's
    lines = [
        "# Every key kdpipe reads, validated when a stage starts (docs/params.md says what each means). Change one and",
        "# `dvc repro` re-runs only the stages that read it; `dvc exp run -S student.seed=1` runs a variation.",
        "data:",
        f"  dataset: {'folder' if folder else 'synthetic'}",
        "  mirror: null",
        f"  path: {_flow(data)}" + ("   # your images: train/<class>/*, test/<class>/* (relative to this folder)"
                                    if folder else "   # a folder of your images: train/<class>/*, test/<class>/*"),
        "  subset: false",
        "  synthetic: " + _flow(config.Synthetic().model_dump()) + ("   # unused (dataset: folder)" if folder else ""),
        f"  image_size: {image_size}" + ("   # the side the models see (pretrained weights: 224)" if folder else ""),
        f"  augment: {'imagenet' if folder else 'cifar'}" + ("   # RandomResizedCrop + flip; test: resize, centre crop"
                                                           if folder else ""),
        f"  normalize: {'imagenet' if folder else 'dataset'}" + ("   # the mean/std pretrained weights saw"
                                                               if folder else ""),
        f"  source: {'stream' if folder else 'memory'}" + ("   # decoded per epoch: any number of images, any size"
                                                         if folder else ""),
        "",
        "teacher:",
        *_train_section(teacher, _default_weights(teacher), epochs),
        "",
        "student:                   # the baseline and every distilled student: the same model, recipe and seed",
        *_train_section(student, _default_weights(student), epochs),
        "",
        f"distill:                   # each method's weights and settings (docs/methods.md); epoch counts for {epochs} epochs",
        *[f"  {m}: {_flow(_method_params(m, epochs))}" + ("   # the qat@ stages' loss" if m not in methods else "")
          for m in distilled],
        "",
        "evaluate: " + _flow({k: v for k, v in sorted(config.Evaluate(batch_size=256, workers="auto").model_dump().items(),
                                                      key=lambda kv: kv[0] in ("cpu_isa", "cpu_threads", "workers"))}),
        "",
        "",
        "# INT8: post-training static quantization of each student's ONNX file (docs/export.md)",
        "quantize: " + _flow(config.Quantize().model_dump()),
        "# quantization-aware fine-tuning against the teacher (`kdpipe qat`, the qat@ stages: `kdpipe init --qat`)",
        "qat: " + _flow(config.Qat().model_dump()),
        "# latency and throughput of every ONNX file on this machine's CPU (docs/export.md)",
        "measure: " + _flow(config.Measure().model_dump()),
    ]
    return "\n".join(lines) + "\n"


def _template(name: str) -> str:
    # named .in, not dvc.yaml: DVC reads every dvc.yaml inside a repository as a pipeline
    return (resources.files("kdpipe") / "templates" / name).read_text()


def dvc_text(methods: list[str], folder: bool = True, qat: list[str] = ()) -> str:
    """dvc.yaml of a project distilling with `methods`; the students in `qat` also fine-tuned for INT8 (qat@)."""
    runs = ["teacher", "student", *methods]
    students = ["student", *methods]
    int8 = [f"{s}.int8" for s in students] + [f"{s}.qat" for s in qat]
    measured = [*runs, *int8]
    text = _template("dvc.yaml.in")
    indent = " " * 6
    fills = {
        "@DATA_DEPS@": "    deps:\n      - ${data.path}\n" if folder else "",  # the synthetic set is drawn, not read
        "@METHODS@": _flow(methods), "@RUNS@": _flow(runs), "@STUDENTS@": _flow(students),
        "@MEASURED@": " ".join(measured),
        # the ONNX files timed, the checkpoints their parameters and MACs are counted from, their accuracy
        "@MEASURE_DEPS@": "\n".join([f"{indent}- data/prepared/manifest.json"]
                                    + [f"{indent}- models/{n}.onnx" for n in measured]
                                    + [f"{indent}- models/{n}.pt" for n in runs]
                                    + [f"{indent}- metrics/{n}.json" for n in measured]),
        "@REPORTED@": " ".join(runs),
        "@REPORT_DEPS@": "\n".join(f"{indent}- {f}" for n in runs
                                   for f in (f"metrics/{n}.json", f"logs/{n}.json", f"plots/{n}.csv"))
                         + "\n" + "\n".join(f"{indent}- metrics/{n}.json" for n in int8)
                         + f"\n{indent}- metrics/measure.json",
        "@PLOT_FILES@": "\n".join(f"{' ' * 8}plots/{n}.csv: test_top1" for n in runs),
        # the qat@ stages, where `--qat` names students (the stage's own template, filled the same way)
        "@QAT@": _template("qat-stage.yaml.in").replace("@QAT_STUDENTS@", _flow(list(qat))) if qat else "",
    }
    for key, value in fills.items():
        text = text.replace(key, value)
    return text


def readme_text(methods: list[str]) -> str:
    return f"""# A kdpipe project

Written by `kdpipe init`: a teacher fine-tuned on your images, distilled into a small student with
{", ".join(methods)}, beside the student trained alone; each exported to ONNX, the students quantized to INT8,
measured (latency, size, MACs) and reported.

```bash
source .venv/bin/activate    # or wherever kdpipe is installed: `.venv/bin/dvc repro` works too
dvc repro                    # data -> teacher / student -> distill -> evaluate -> export -> quantize -> measure -> report
cat reports/results.md       # accuracy, the INT8 drop, latency and size per model
dvc plots show               # accuracy per epoch, and Top-1 against latency (dvc_plots/index.html)
git add -A && git commit -m "results"      # the metrics are committed: `dvc exp show` compares them
dvc exp run -S student.seed=1              # a variation; `dvc exp show` puts it beside the committed run
```

- params.yaml: every setting; `data.path` is your image folder (train/<class>/*, test/<class>/*).
- dvc.yaml: the stages. kdpipe-code.yaml: the installed kdpipe's code per stage; after upgrading kdpipe run
  `kdpipe sync`, then `dvc repro` re-runs the stages whose code changed.
- An interrupted training stage resumes from its last finished epoch when run again (`dvc repro` too).
"""


GITIGNORE = """# what the pipeline writes that DVC caches (it adds its own entries for the outputs); metrics/ and plots/ are
# committed, so `dvc exp show` and `dvc metrics diff` read them in every revision
/dvc_plots/
*.resume
.*.tmp*
"""


def project_files(data: str | None, teacher: str, student: str, image_size: int, methods: list[str],
                  epochs: int = 10, qat: list[str] = ()) -> dict[str, str]:
    """The files `kdpipe init` writes (relative path -> text), kdpipe-code.yaml included."""
    return {
        "params.yaml": params_text(data, teacher, student, image_size, methods, epochs, qat),
        "dvc.yaml": dvc_text(methods, data is not None, qat),
        "README.md": readme_text(methods),
        ".gitignore": GITIGNORE,
        CODE_FILE: code_text(),
    }


def _run(args: list[str], cwd: Path) -> None:
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise ProjectError(f"`{' '.join(args)}` in {cwd} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")


def data_path(data: Path | None, folder: Path) -> str | None:
    """`--data` as params.yaml says it: paths there are read from the params' own folder, so a relative one
    (from where `kdpipe init` runs) is rewritten relative to the project."""
    if data is None:
        return None
    return str(data) if data.is_absolute() else os.path.relpath(data.resolve(), folder.resolve())


def init(folder: Path, data: str | None, teacher: str, student: str, image_size: int, methods: list[str],
         epochs: int = 10, force: bool = False, qat: list[str] = ()) -> list[str]:
    """Write the project into `folder` (created if absent); git and DVC initialised where they are not. Validated
    before anything is written: the params must load, and no existing file is overwritten without `force`."""
    files = project_files(data, teacher, student, image_size, methods, epochs, qat)
    config.validate(yaml.safe_load(files["params.yaml"]))  # a typo in a model name fails here, with nothing written
    clash = sorted(n for n in files if (folder / n).exists())
    if clash and not force:
        raise ProjectError(f"{folder}: {', '.join(clash)} already exist (--force overwrites them)")
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    done = []
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True)
    if top.returncode:
        _run(["git", "init", "-q"], folder)
        done.append("git init")
    # a project inside another git repository (this repository's examples/compress) is a DVC subdir project
    subdir = top.returncode == 0 and Path(top.stdout.strip()).resolve() != folder.resolve()
    if not (folder / ".dvc").is_dir():
        _run([sys.executable, "-m", "dvc", "init", "-q"] + (["--subdir"] if subdir else []), folder)
        done.append("dvc init" + (" --subdir" if subdir else ""))
    return done
