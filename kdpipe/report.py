"""`kdpipe report`: the results table (published format) and accuracy-per-epoch plot, from DVC outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml

# The published figures we compare with, each table with its source and metric convention
PUBLISHED_FILE = Path(__file__).with_name("published.yaml")
_REFERENCE = yaml.safe_load(PUBLISHED_FILE.read_text())


def _pairs(table: dict) -> dict[tuple[str, str], object]:
    return {tuple(k.split("->")): v for k, v in table.items()}


PUBLISHED = {m: tuple(row) for m, row in _REFERENCE["he2016"]["models"].items()}
RESNET_TABLE_METRIC = _REFERENCE["he2016"]["metric"]  # the Top-1 the ResNet table reports: the best epoch's


def published(model: str, dataset: str):
    """(top1, top5) published for `model` on `dataset`, or None."""
    row = PUBLISHED.get(model)
    if row is None or dataset not in ("cifar10", "cifar100"):
        return None
    return row[2:4] if dataset == "cifar10" else row[4:6]


PRETTY = {"resnet8x4": "ResNet-8x4", "resnet32x4": "ResNet-32x4", "resnet50": "ResNet-50", "mobilenetv2": "MobileNetV2",
          "shufflev1": "ShuffleNetV1", "shufflev2": "ShuffleNetV2"}


def pretty(model: str) -> str:
    if model in PRETTY:
        return PRETTY[model]
    if model.startswith("wrn_"):
        return "WRN-" + model[4:].replace("_", "-")
    if model.startswith("vgg"):
        return "VGG-" + model[3:]
    if model.startswith("resnet"):
        return "ResNet-" + model.removeprefix("resnet")
    return model  # a library's model (tv/resnet50, timm/...) keeps its name


def collect(names: list[str], metrics_dir: Path, logs_dir: Path) -> list[dict]:
    rows = []
    for name in names:
        m = json.loads((metrics_dir / f"{name}.json").read_text())
        if "not_applicable" in m:
            continue
        info = json.loads((logs_dir / f"{name}.json").read_text())
        rows.append({"name": name, **info, **m})
    return rows


def table(rows: list[dict], dataset: str) -> str:
    with_pub = dataset in ("cifar10", "cifar100")
    head = ["Model", "Param (M)", "Top1 (%)", "Top5 (%)", "Top1 last (%)", "Δ Top1 vs student"]
    if with_pub:
        head += ["Target Top1 / Top5"]  # the ResNet table's figures (he2016): the project's targets
    base = next((r["top1"] for r in rows if r["role"] == "student"), None)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        label = f"{pretty(r['model'])} ({r['role'] if r['role'] != 'distill' else r['method']})"
        delta = f"{r['top1'] - base:+.2f}" if r["role"] == "distill" and base is not None else ""
        label += " ⚠" if "warning" in r else ""
        top5 = f"{r['top5']:.2f}" if "top5" in r else "—"  # none for 5 classes or fewer
        cells = [label, f"{r['params_m']:.2f}", f"{r['top1']:.2f}", top5, f"{r['top1_last']:.2f}", delta]
        if with_pub:
            pub = published(r["model"], dataset)
            cells.append(f"{pub[0]:.2f} / {pub[1]:.2f}" if pub else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + collapse_notes({r["name"]: r["warning"] for r in rows if "warning" in r})


def collapse_notes(found: dict[str, str]) -> str:
    """The note under a table naming each run whose model collapsed (metrics' `warning`), its rows marked ⚠."""
    return "".join(f"\n\n⚠ {name}: {text}" for name, text in found.items())


def loss_terms(rows: list[dict]) -> str:
    """What each part of the distilled students' loss was in their last epoch: the training loss is the sum of
    gamma * CE (`ce`), alpha * KD (`kd`) and each method's beta * term (the per-epoch values: plots/NAME.csv)."""
    lines = []
    for r in rows:
        last = (r.get("loss_terms") or [{}])[-1]
        terms = {k: v for k, v in last.items() if k not in ("epoch", "phase")}
        if r["role"] == "distill" and terms:
            parts = " + ".join(f"{k} {v:.4f}" for k, v in terms.items())
            lines.append(f"| {r['name']} | {sum(terms.values()):.4f} = {parts} |")
    if not lines:
        return ""
    return ("\n## Loss terms\n\nThe training loss of each distilled student in its last epoch, as the sum of its "
            "weighted terms: `ce` = gamma · cross-entropy, `kd` = alpha · KD, and beta · each method's own term "
            "(plots/NAME.csv has them per epoch).\n\n| run | loss = terms |\n|---|---|\n" + "\n".join(lines) + "\n")


def plot(rows: list[dict], plots_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        with (plots_dir / f"{r['name']}.csv").open() as f:
            hist = list(csv.DictReader(f))
        ax.plot([int(h["epoch"]) for h in hist], [float(h["test_top1"]) for h in hist], label=r["name"])
    many = len(rows) > 10
    ax.legend(fontsize=6 if many else None, ncol=2 if many else 1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test Top-1 (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)


def int8_section(names: list[str], metrics_dir: Path) -> str:
    """A row per run quantized by `kdpipe quantize` (metrics/NAME.int8.json): INT8 Top-1/Top-5 and the drop from
    its fp32 ONNX file, both tested with onnxruntime on the whole test set; "" where none was."""
    lines = []
    for name in names:
        f = metrics_dir / f"{name}.int8.json"
        if f.is_file():
            m = json.loads(f.read_text())
            t5 = lambda k: f"{m[k]:.2f}" if k in m else "–"  # noqa: E731
            lines.append(f"| {name} (INT8) | {m['top1']:.2f} | {t5('top5')} | {m['fp32_top1']:.2f} | {t5('fp32_top5')} "
                         f"| {-m['top1_drop']:+.2f} | {m['calibration_images']} |")
    if not lines:
        return ""
    return ("\n## INT8\n\nPost-training static INT8 (`kdpipe quantize`: onnxruntime, QDQ) of each exported student, "
            "and its fp32 ONNX file (the last epoch's weights), both tested with onnxruntime on the whole test set.\n\n"
            "| model | Top1 (%) | Top5 (%) | fp32 ONNX Top1 (%) | fp32 ONNX Top5 (%) | Δ Top1 vs fp32 | calibration images |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def deployment(names: list[str], metrics_dir: Path) -> dict:
    """The entries of metrics/measure.json (`kdpipe measure`) of these runs' model files (NAME, NAME.int8)."""
    f = metrics_dir / "measure.json"
    if not f.is_file():
        return {}
    measured = json.loads(f.read_text())
    return {k: v for k, v in measured.items() if not k.startswith("_") and k.removesuffix(".int8") in names}


def deployment_section(measured: dict, machine: dict) -> str:
    if not measured:
        return ""
    lines = []
    for name, r in measured.items():
        fp = measured.get(name.removesuffix(".int8")) if name.endswith(".int8") else None
        speedup = f"{fp['latency_ms_p50'] / r['latency_ms_p50']:.2f}×" if fp else ""
        lines.append(f"| {name} | {r['precision']} | {r['top1']:.2f} | {r['latency_ms_p50']:.2f} | "
                     f"{r['latency_ms_p95']:.2f} | {r['images_per_s']:.0f} | {r['size_mb']:.2f} | {r['params_m']:.2f} | "
                     f"{r['macs_g']:.3f} | {speedup} |")
    where = (f"{machine.get('cpu', '?')}, onnxruntime {machine.get('onnxruntime', '?')}, "
             f"{machine.get('threads', '?')} thread(s)") if machine else "see metrics/measure.json"
    return ("\n## Deployment\n\n`kdpipe measure` on the CPU (" + where + "): batch-1 latency, images/s at batch "
            f"{next(iter(measured.values()))['batch_size']}, file size; parameters and MACs of the PyTorch model. "
            "Top1: the last epoch's (the exported weights) for fp32, the INT8 test for int8. Speed-up: the fp32 file's "
            "p50 over the INT8 file's.\n\n"
            "| model | precision | Top1 (%) | p50 (ms) | p95 (ms) | images/s | size (MB) | params (M) | MACs (G) | "
            "speed-up |\n|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines)
            + "\n\n![Top-1 vs batch-1 latency](pareto.png)\n")


def pareto_plot(measured: dict, out: Path) -> None:
    """Top-1 against batch-1 latency (log scale), a labelled point per model, the Pareto front as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(measured)
    pts = [(measured[n]["latency_ms_p50"], measured[n]["top1"]) for n in names]
    front = sorted(p for n, p in zip(names, pts) if measured[n].get("pareto"))  # as `kdpipe measure` found it
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, (x, y) in zip(names, pts):
        ax.scatter([x], [y], marker="s" if measured[n]["precision"] == "int8" else "o", zorder=3)
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("batch-1 latency p50 (ms, log scale)")
    ax.set_ylabel("test Top-1 (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)


def write(names: list[str], manifest: dict, metrics_dir: Path, logs_dir: Path, plots_dir: Path, out_dir: Path) -> str:
    rows = collect(names, metrics_dir, logs_dir)
    dataset = manifest["dataset"]
    text = (f"# kdpipe results — {dataset}\n\n"
            f"Data: {manifest['train_size']} train / {manifest['test_size']} test images, "
            f"{manifest['num_classes']} classes ({manifest['source']}).\n"
            "Top1 is the best epoch's test Top-1, Top5 the last epoch's test Top-5 (the published convention); "
            "Top1 last is the last epoch's Top-1.\n\n" + table(rows, dataset) + "\n\n![test accuracy](accuracy.png)\n"
            + loss_terms(rows))
    # the deployment parts, only where `kdpipe quantize` / `kdpipe measure` ran (else the report is as before)
    measured = deployment(names, metrics_dir)
    machine = json.loads((metrics_dir / "measure.json").read_text()).get("_machine", {}) if measured else {}
    text += int8_section(names, metrics_dir) + deployment_section(measured, machine)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(text)
    plot(rows, plots_dir, out_dir / "accuracy.png")
    if measured:
        pareto_plot(measured, out_dir / "pareto.png")
    return text


# --- the full pipelines: a grid of models x seeds and methods x pairs x seeds -----------------------
# CRD's CIFAR-100 figures are the last epoch's accuracy, so our side of the comparison is `top1_last` too.
DISTILL_METRIC = _REFERENCE["crd"]["metric"]
CRD = {pair: {k: v for k, v in zip(_REFERENCE["crd"]["rows"], col) if v is not None}
       for pair, col in _pairs(_REFERENCE["crd"]["pairs"]).items()}
def _per_model(table: dict) -> dict:
    """A table's teacher and student rows, per model (one figure each: equal across the pairs they appear in)."""
    return {m: table[pair][role] for pair in table for m, role in zip(pair, ("teacher", "student"))}


CRD_MODELS = _per_model(CRD)
# the tables of methods published after CRD (DKD, DIST): method -> its table (source, convention, metric, note)
METHOD_TABLES = {t["method"]: t for t in _REFERENCE.values() if "method" in t}
METHOD_FIGURES = {m: _pairs(t["pairs"]) for m, t in METHOD_TABLES.items()}  # method -> {(teacher, student): Top-1}
IMAGENET = _pairs(_REFERENCE["imagenet"]["pairs"])  # (teacher, student) -> {row: [Top-1, Top-5 or None]}
IMAGENET_CONVENTION = _REFERENCE["imagenet"]["convention"]
IMAGENET_MODELS = _per_model(IMAGENET)


def method(name: str):
    """The registered term class of method `name` (its `label`)."""
    from . import distill

    return distill.get(name)


def recipe_text(cfg) -> str:
    """One line saying how a section trains, e.g. `repdistiller` (240 epochs, batch 64, lr 0.05 x0.1 at 150/180/210)."""
    at = "/".join(str(round(m * cfg.epochs)) for m in cfg.schedule.milestones)
    by_model = cfg.optim.lr_by_model
    special = "".join(f"; lr {lr:g} for {', '.join(m for m, v in by_model.items() if v == lr)}"
                      for lr in sorted(set(by_model.values())))
    lr = f"{cfg.optim.lr:g}" + (f" per {cfg.optim.lr_batch} images" if cfg.optim.lr_batch else "")
    return (f"`{cfg.recipe or 'custom'}` ({cfg.epochs} epochs, batch {cfg.batch_size}, SGD lr {lr} "
            f"x{cfg.schedule.gamma:g} at epochs {at}, wd {cfg.optim.weight_decay:g}{special})")


def trained_run(recipe: str, model: str, seed: int) -> str:
    """The run name of a model trained from scratch (or a published teacher) in the full pipelines."""
    return f"{recipe}-{model}-s{seed}"


def distill_run(method: str, teacher: str, student: str, seed: int) -> str:
    return f"{method}-{teacher}-{student}-s{seed}"


def stats(values: list[float]) -> tuple[float, float, int] | None:
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, std, n


def fmt(s) -> str:
    return "–" if s is None else f"{s[0]:.2f} ± {s[1]:.2f} (n={s[2]})"


def grid(p, manifest: dict, metrics_dir: Path, plots_dir: Path, out_dir: Path) -> str:
    dataset = manifest["dataset"]

    warned: dict[str, str] = {}  # run -> its collapse warning, listed under the tables

    def metric(name: str, key: str) -> list[float]:
        f = metrics_dir / f"{name}.json"
        m = json.loads(f.read_text()) if f.is_file() else {}
        if "warning" in m:
            warned[name] = m["warning"]
        return [m[key]] if key in m else []

    def mark(fn) -> str:  # ⚠ after a cell one of whose seeds' runs collapsed
        return " ⚠" if any(fn(s) in warned for s in p.seeds) else ""

    def not_applicable(fn) -> bool:  # every seed's run recorded as N/A (a method the pair does not admit)
        files = [metrics_dir / f"{fn(s)}.json" for s in p.seeds]
        return all(f.is_file() and "not_applicable" in json.loads(f.read_text()) for f in files)

    def over_seeds(fn, key):
        return stats([v for s in p.seeds for v in metric(fn(s), key)])

    lines = [f"# kdpipe results — {dataset}", "",
             f"Data: {manifest['train_size']} train / {manifest['test_size']} test images, {manifest['num_classes']} "
             f"classes ({manifest['source']}). Seeds: {', '.join(map(str, p.seeds))}. Cells: mean ± sample std (n).", ""]
    cifar = dataset in ("cifar10", "cifar100")
    crd, imagenet = dataset == "cifar100", dataset == "imagenet"  # the benchmarks with published figures

    def model_rows(models: list[str], recipe: str, reference) -> list[str]:
        """One row per model; `reference(model)` -> (label, our metric key, published value) or None."""
        rows = []
        for model in models:
            run = lambda s: trained_run(recipe, model, s)  # noqa: E731
            params = metric(run(p.seeds[0]), "params_m")
            label = pretty(model) + (" (published)" if model in p.published and recipe == p.teacher.recipe else "")
            cells = [label, f"{params[0]:.2f}" if params else "–"] + [fmt(over_seeds(run, k)) for k in ("top1", "top5", "top1_last")]
            cells[0] += mark(run)
            ref = reference(model)
            if ref is not None:
                ours = over_seeds(run, ref[1])
                cells += [ref[0], f"{ours[0] - ref[2]:+.2f}" if ours and ref[2] is not None else "–"]
            rows.append("| " + " | ".join(cells) + " |")
        return rows

    head = "| Model | Param (M) | Top1 (%) | Top5 (%) | Top1 last (%) |"
    if p.table_models:
        def seed_figure(model):
            pub = published(model, dataset)
            return (f"{pub[0]:.2f} / {pub[1]:.2f}" if pub else "–", RESNET_TABLE_METRIC, pub[0] if pub else None) if cifar else None
        lines += ["## The ResNet table", "",
                  f"Our numbers: recipe {recipe_text(p.table)}. Top1 = best epoch's test Top-1, Top5 = last epoch's "
                  "test Top-5, the ResNet table's convention; Top1 last = last epoch's Top-1."
                  + (" Target: the ResNet table's figures, the project's targets (kdpipe/published.yaml `he2016`), "
                     "not figures printed by He et al." if cifar else ""), "",
                  head + (" Target Top1 / Top5 | Δ Top1 |" if cifar else ""),
                  "|---|---|---|---|---|" + ("---|---|" if cifar else "")]
        lines += model_rows(p.table_models, p.table.recipe, seed_figure) + [""]
    if p.models or p.published:
        def published_figure(model):
            if imagenet:
                t1, t5 = IMAGENET_MODELS.get(model, (None, None))
                return (" / ".join("–" if v is None else f"{v:.2f}" for v in (t1, t5)), "top1", t1)
            if not crd:
                return None
            ref = CRD_MODELS.get(model)
            return (f"{ref:.2f}" if ref is not None else "–", DISTILL_METRIC, ref)
        lines += ["## Teachers and students' baselines", "",
                  f"Our numbers: recipe {recipe_text(p.teacher)}." + (
                      " Published teachers (imported, not trained; the same file for every seed): Top1 = Top1 last = "
                      "their test accuracy here." if p.published else "") + (
                      " Beside them CRD's figures for the same models (RepDistiller's README, last epoch), compared "
                      "with our Top1 last." if crd else "") + (
                      f" Beside them the published figures ({IMAGENET_CONVENTION}), compared with our Top1 (best)."
                      if imagenet else ""), "",
                  head + (" CRD Top1 (last) | Δ Top1 last |" if crd else "")
                  + (" Published Top1 / Top5 (best) | Δ Top1 |" if imagenet else ""),
                  "|---|---|---|---|---|" + ("---|---|" if crd or imagenet else "")]
        lines += model_rows(p.models + p.published, p.teacher.recipe, published_figure) + [""]

    pairs = [(pr.teacher, pr.student) for pr in p.pairs]
    cols = [f"{pretty(t)} → {pretty(s)}" for t, s in pairs]
    deltas: dict[str, dict[int, float]] = {}
    # a method with a published table of its own (DKD, DIST: kdpipe/published.yaml) is compared with its figures
    # on that table's metric (DKD: mdistiller's best epoch), marked † with the table's note
    own_table = [m for m in p.methods if crd and m in METHOD_TABLES]
    if imagenet:  # the published table's convention (best epoch) first, then the last epoch's Top-1 and Top-5
        src = "the published figure (" + IMAGENET_CONVENTION + ", kdpipe/published.yaml gives each source)"
        def figure(column):  # the published [Top-1, Top-5] of a row of the pair's table, or None
            return lambda key, t, s: IMAGENET.get((t, s), {}).get(key, [None, None])[column]
        tables = [("Top-1 %, best epoch", "top1", figure(0),
                   f"Top-1 of the **best** epoch, the convention of DKD's ImageNet table; in brackets {src}."),
                  ("Top-1 %, last epoch", "top1_last", lambda key, t, s: None, "Top-1 of the **last** epoch."),
                  ("Top-5 %, last epoch", "top5", figure(1),
                   "Top-5 of the **last** epoch; in brackets the published best-epoch Top-5 where a source gives it.")]
    else:
        tables = [("Top-1 %, last epoch", DISTILL_METRIC,
                   lambda key, t, s: (METHOD_FIGURES[key].get((t, s)) if key in METHOD_FIGURES
                                      else CRD.get((t, s), {}).get(key)) if crd else None,
                   "Top-1 of the **last** epoch (`top1_last`), the convention of CRD and RepDistiller."
                   + (" In brackets: the CIFAR-100 figures published by Tian et al. (CRD, ICLR 2020) for the same pair, "
                      "also last epoch." if crd else ""))]
    row_specs = [("Teacher", "teacher", lambda m, t, s, seed: trained_run(p.teacher.recipe, t, seed)),
                 ("Student (baseline)", "student", lambda m, t, s, seed: trained_run(p.student.recipe, s, seed))]
    row_specs += [(method(m).label + (" †" if m in own_table else ""), m,
                   lambda m, t, s, seed: distill_run(m, t, s, seed)) for m in p.methods]
    for i, (title, table_metric, reference, intro) in enumerate(tables):
        lines += [f"## Distillation ({title})", "",
                  f"Our numbers: recipe {recipe_text(p.student)} for the students (teachers and baselines as above). "
                  + intro, "", "| Method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for label, key, name_of in row_specs:
            cells = []
            for j, (t, s) in enumerate(pairs):
                metric_key = METHOD_TABLES[key]["metric"] if key in own_table else table_metric
                st = over_seeds(lambda seed: name_of(key, t, s, seed), metric_key)
                ref = reference(key, t, s)
                na = st is None and not_applicable(lambda seed: name_of(key, t, s, seed))
                cells.append(("N/A" if na else fmt(st)) + (f" [{ref:.2f}]" if ref is not None else "")
                             + mark(lambda seed: name_of(key, t, s, seed)))
                base = over_seeds(lambda seed: trained_run(p.student.recipe, s, seed), metric_key)
                if i == 0 and key in p.methods and st and base:
                    deltas.setdefault(key, {})[j] = st[0] - base[0]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"† {method(m).label}: {METHOD_TABLES[m]['note']}" for m in own_table]
    lines += [""] if own_table else []
    lines += [f"⚠ {name}: {text}" for name, text in warned.items()] + ([""] if warned else [])
    lines += ["![test accuracy per epoch](accuracy.png)", "", "![Δ Top-1 over the student baseline](delta.png)", ""]
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(text)
    seed = p.seeds[0]
    panels = []  # (title, [(label, run name)]): the ResNet table, then one panel per pair
    if p.table_models:
        panels.append((f"the ResNet table ({p.table.recipe})",
                       [(pretty(m), trained_run(p.table.recipe, m, seed)) for m in p.table_models]))
    for t, s in pairs:
        panels.append((f"{pretty(t)} → {pretty(s)}",
                       [("teacher", trained_run(p.teacher.recipe, t, seed)),
                        ("student (baseline)", trained_run(p.student.recipe, s, seed))]
                       + [(method(m).label, distill_run(m, t, s, seed)) for m in p.methods]))
    curves_by_pair(panels, plots_dir, out_dir / "accuracy.png", f"test Top-1 (%) per epoch, seed {seed}")
    heatmap(deltas, list(deltas), cols, out_dir / "delta.png")
    return text


def curves_by_pair(panels: list[tuple[str, list[tuple[str, str]]]], plots_dir: Path, out: Path, title: str) -> None:
    """Small multiples: a panel per pair (and one for the ResNet table), a colour per label across panels,
    one legend for the figure: readable at 13 pairs x 16 runs, where one plot with a legend entry per run is not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(label for _, runs in panels for label, _ in runs))
    colours = {label: plt.get_cmap("tab20")(i % 20) for i, label in enumerate(labels)}
    ncols = min(4, max(len(panels), 1))
    nrows = -(-max(len(panels), 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.8 * nrows + 0.8), squeeze=False)
    drawn = {}
    for ax, (panel, runs) in zip(axes.flat, panels):
        for label, name in runs:
            f = plots_dir / f"{name}.csv"
            if not f.is_file():
                continue
            with f.open() as fh:
                hist = list(csv.DictReader(fh))
            style = "--" if label in ("teacher", "student (baseline)") else "-"
            drawn[label] = ax.plot([int(h["epoch"]) for h in hist], [float(h["test_top1"]) for h in hist], style,
                                   color=colours[label], lw=1)[0]
        ax.set_title(panel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    if drawn:
        fig.legend(list(drawn.values()), list(drawn), loc="lower center", ncol=min(len(drawn), 8), fontsize=7,
                   frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.012 * (len(drawn) // 8) if drawn else 0, 1, 1))
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)


def heatmap(deltas: dict[str, dict[int, float]], methods: list[str], pair_labels: list[str], out: Path) -> None:
    """Δ Top-1 over the student baseline, mean over seeds: methods x pairs, blank where not run or N/A."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((max(len(methods), 1), max(len(pair_labels), 1)), np.nan)
    for i, m in enumerate(methods):
        for j, v in deltas[m].items():
            grid[i, j] = v
    span = max(float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 0.0, 0.5)
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(pair_labels), 1.5 + 0.42 * max(len(methods), 1)))
    image = ax.imshow(grid, cmap="RdBu", vmin=-span, vmax=span, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(pair_labels)), pair_labels, rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(methods)), [method(m).label for m in methods], fontsize=8)
    fig.colorbar(image, ax=ax, label="Δ Top-1 over the baseline (%)")
    fig.tight_layout()
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)
