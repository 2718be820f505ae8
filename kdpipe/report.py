"""`kdpipe report`: the results tables in markdown, from DVC outputs: a named list of runs (`write`: the quickstart,
a project of one's own) or a full pipeline's grid (`grid`); the figures are plots.py's, the published figures
published.py's."""

from __future__ import annotations

import json
from pathlib import Path

from .config import METHODS, Manifest, parse_run
from .names import INT8_FILES, distill_run, model_file, pretty, trained_run
from .plots import curves_by_pair, heatmap, pareto_plot, plot
from .published import (CRD, CRD_MODELS, DISTILL_METRIC, IMAGENET, IMAGENET_CONVENTION, IMAGENET_MODELS,
                        METHOD_FIGURES, METHOD_TABLES, RESNET_TABLE_METRIC, published)


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



def int8_section(names: list[str], metrics_dir: Path) -> str:
    """A row per INT8 file of these runs (metrics/NAME.int8.json from `kdpipe quantize`, NAME.qat.json from
    `kdpipe qat`): its Top-1/Top-5 and the drop from the run's fp32 ONNX file, both tested with onnxruntime on the
    whole test set; "" where there is none."""
    lines = []
    for name in names:
        for suffix, how in INT8_FILES.items():
            f = metrics_dir / f"{name}{suffix}.json"
            if f.is_file():
                m = json.loads(f.read_text())
                t5 = lambda k: f"{m[k]:.2f}" if k in m else "–"  # noqa: E731
                kind = f"QAT, {m['qat']['epochs']} epochs" if "qat" in m else "PTQ"
                lines.append(f"| {name}{suffix} ({kind}) | {m['top1']:.2f} | {t5('top5')} | {m['fp32_top1']:.2f} | "
                             f"{t5('fp32_top5')} | {-m['top1_drop']:+.2f} | {m['calibration_images']} |")
    if not lines:
        return ""
    return ("\n## INT8\n\nStatic INT8 (onnxruntime, QDQ) of each exported student: post-training (PTQ, `kdpipe "
            "quantize`) and, where it ran, after quantization-aware fine-tuning against the teacher (QAT, `kdpipe qat`); "
            "beside the student's fp32 ONNX file (the last epoch's weights), all tested with onnxruntime on the whole "
            "test set.\n\n"
            "| model | Top1 (%) | Top5 (%) | fp32 ONNX Top1 (%) | fp32 ONNX Top5 (%) | Δ Top1 vs fp32 | calibration images |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def deployment(names: list[str], metrics_dir: Path) -> dict:
    """The entries of metrics/measure.json (`kdpipe measure`) of these runs' model files (NAME, NAME.int8, ...)."""
    f = metrics_dir / "measure.json"
    if not f.is_file():
        return {}
    measured = json.loads(f.read_text())
    return {k: v for k, v in measured.items() if not k.startswith("_") and model_file(k)[0] in names}


def deployment_section(measured: dict, machine: dict) -> str:
    if not measured:
        return ""
    lines = []
    for name, r in measured.items():
        base, int8 = model_file(name)
        fp = measured.get(base) if int8 else None
        speedup = f"{fp['latency_ms_p50'] / r['latency_ms_p50']:.2f}×" if fp else ""
        lines.append(f"| {name} | {r['precision']} | {r['top1']:.2f} | {r['latency_ms_p50']:.2f} "
                     f"({r['latency_ms_iqr']:.2f}) | {r['latency_ms_p95']:.2f} | {r['images_per_s']:.0f} "
                     f"({r['images_per_s_iqr']:.0f}) | {r['size_mb']:.2f} | {r['params_m']:.2f} | "
                     f"{r['macs_g']:.3f} | {speedup} | {'✓' if r['pareto'] else ''} |")
    where = (f"{machine.get('cpu', '?')} ({', '.join(machine.get('isa', [])) or 'no AVX2'}; "
             f"{machine.get('cores_available', '?')} cores available), onnxruntime {machine.get('onnxruntime', '?')}, "
             f"{machine.get('threads', '?')} thread(s), load average {machine.get('load_average_before', ['?'])[0]} "
             "before timing") if machine else "see metrics/measure.json"
    return ("\n## Deployment\n\n`kdpipe measure` on the CPU (" + where + "): the models timed interleaved over "
            f"{machine.get('rounds', '?')} rounds; batch-1 latency p50 with its spread (the interquartile range of "
            f"the rounds' p50s), p95, images/s at batch {next(iter(measured.values()))['batch_size']} (its IQR over "
            "rounds), file size; parameters and MACs of the PyTorch model. "
            "Top1: the last epoch's (the exported weights) for fp32, the INT8 test for int8. Speed-up: the fp32 file's "
            "p50 over the INT8 file's. Front: on the Pareto front of Top-1 and latency, where a latency difference "
            "counts only beyond the spread and files of one graph have one latency.\n\n"
            "| model | precision | Top1 (%) | p50 (IQR) (ms) | p95 (ms) | images/s (IQR) | size (MB) | params (M) | "
            "MACs (G) | speed-up | front |\n|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines)
            + "\n\n![Top-1 vs batch-1 latency](pareto.png)\n")



def write(names: list[str], manifest: Manifest, metrics_dir: Path, logs_dir: Path, plots_dir: Path, out_dir: Path) -> str:
    rows = collect(names, metrics_dir, logs_dir)
    dataset = manifest.dataset
    text = (f"# kdpipe results — {dataset}\n\n"
            f"Data: {manifest.train_size} train / {manifest.test_size} test images, "
            f"{manifest.num_classes} classes ({manifest.source}).\n"
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

def label(row: str) -> str:
    """A method's (or a combination's, or a variant's) name in tables and plots: its registered terms' labels,
    a variant's tag in capitals (`kd+ls` -> KD+LS)."""
    from . import distill

    return "+".join(distill.get(m).label if m in METHODS else m.upper() for m in row.split("+"))


def recipe_text(cfg) -> str:
    """One line saying how a section trains, e.g. `repdistiller` (240 epochs, batch 64, lr 0.05 x0.1 at 150/180/210)."""
    at = "/".join(str(round(m * cfg.epochs)) for m in cfg.schedule.milestones)
    by_model = cfg.optim.lr_by_model
    special = "".join(f"; lr {lr:g} for {', '.join(m for m, v in by_model.items() if v == lr)}"
                      for lr in sorted(set(by_model.values())))
    lr = f"{cfg.optim.lr:g}" + (f" per {cfg.optim.lr_batch} images" if cfg.optim.lr_batch else "")
    sgd = "Nesterov SGD" if cfg.optim.nesterov else "SGD"
    no_decay = " (none on norm weights and biases)" if cfg.optim.no_decay == "norm_and_bias" else ""
    return (f"`{cfg.recipe or 'custom'}` ({cfg.epochs} epochs, batch {cfg.batch_size}, {sgd} lr {lr} "
            f"x{cfg.schedule.gamma:g} at epochs {at}, wd {cfg.optim.weight_decay:g}{no_decay}{special})")


def stats(values: list[float]) -> tuple[float, float, int] | None:
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, std, n


def fmt(s) -> str:
    return "–" if s is None else f"{s[0]:.2f} ± {s[1]:.2f} (n={s[2]})"


class Seeds:
    """A grid's metrics over its seeds: a cell is a run, a function of the seed giving the run's name. The
    collapse warnings met while reading are kept (`warned`: run -> warning) for the notes under the tables."""

    def __init__(self, seeds: list[int], metrics_dir: Path):
        self.seeds, self.metrics_dir = seeds, metrics_dir
        self.warned: dict[str, str] = {}

    def read(self, name: str) -> dict:
        f = self.metrics_dir / f"{name}.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def metric(self, name: str, key: str) -> list[float]:
        m = self.read(name)
        if "warning" in m:
            self.warned[name] = m["warning"]
        return [m[key]] if key in m else []

    def stats(self, run, key: str):
        return stats([v for s in self.seeds for v in self.metric(run(s), key)])

    def mark(self, run) -> str:  # ⚠ after a cell one of whose seeds' runs collapsed
        return " ⚠" if any(run(s) in self.warned for s in self.seeds) else ""

    def not_applicable(self, run) -> bool:  # every seed's run recorded as N/A (a method the pair does not admit)
        return all("not_applicable" in self.read(run(s)) for s in self.seeds)


MODEL_HEAD = "| Model | Param (M) | Top1 (%) | Top5 (%) | Top1 last (%) |"


def model_rows(seeds: Seeds, models: list[str], recipe: str, published_teachers: list[str], reference) -> list[str]:
    """One row per model trained under `recipe`; `reference(model)` -> (label, our metric key, published value) or
    None."""
    rows = []
    for model in models:
        run = lambda s: trained_run(recipe, model, s)  # noqa: E731
        params = seeds.metric(run(seeds.seeds[0]), "params_m")
        name = pretty(model) + (" (published)" if model in published_teachers else "")
        cells = [name, f"{params[0]:.2f}" if params else "–"] + [fmt(seeds.stats(run, k)) for k in ("top1", "top5", "top1_last")]
        cells[0] += seeds.mark(run)
        ref = reference(model)
        if ref is not None:
            ours = seeds.stats(run, ref[1])
            cells += [ref[0], f"{ours[0] - ref[2]:+.2f}" if ours and ref[2] is not None else "–"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def resnet_table_section(p, seeds: Seeds, dataset: str) -> list[str]:
    """The ResNet table's models under their own recipe, beside the project's targets on CIFAR."""
    cifar = dataset in ("cifar10", "cifar100")

    def target(model):
        pub = published(model, dataset)
        return (f"{pub[0]:.2f} / {pub[1]:.2f}" if pub else "–", RESNET_TABLE_METRIC, pub[0] if pub else None) if cifar else None
    return (["## The ResNet table", "",
             f"Our numbers: recipe {recipe_text(p.table)}. Top1 = best epoch's test Top-1, Top5 = last epoch's "
             "test Top-5, the ResNet table's convention; Top1 last = last epoch's Top-1."
             + (" Target: the ResNet table's figures, the project's targets (kdpipe/published.yaml `he2016`), "
                "not figures printed by He et al." if cifar else ""), "",
             MODEL_HEAD + (" Target Top1 / Top5 | Δ Top1 |" if cifar else ""),
             "|---|---|---|---|---|" + ("---|---|" if cifar else "")]
            + model_rows(seeds, p.table_models, p.table.recipe, p.published if p.table.recipe == p.teacher.recipe else [], target) + [""])


def baselines_section(p, seeds: Seeds, dataset: str) -> list[str]:
    """Teachers (trained or published) and the students' baselines under the teacher recipe, beside CRD's figures
    (CIFAR-100) or the published ones (ImageNet)."""
    crd, imagenet = dataset == "cifar100", dataset == "imagenet"

    def figure(model):
        if imagenet:
            t1, t5 = IMAGENET_MODELS.get(model, (None, None))
            return (" / ".join("–" if v is None else f"{v:.2f}" for v in (t1, t5)), "top1", t1)
        if not crd:
            return None
        ref = CRD_MODELS.get(model)
        return (f"{ref:.2f}" if ref is not None else "–", DISTILL_METRIC, ref)
    return (["## Teachers and students' baselines", "",
             f"Our numbers: recipe {recipe_text(p.teacher)}." + (
                 " Published teachers (imported, not trained; the same file for every seed): Top1 = Top1 last = "
                 "their test accuracy here." if p.published else "") + (
                 " Beside them CRD's figures for the same models (RepDistiller's README, last epoch), compared "
                 "with our Top1 last." if crd else "") + (
                 f" Beside them the published figures ({IMAGENET_CONVENTION}), compared with our Top1 (best)."
                 if imagenet else ""), "",
             MODEL_HEAD + (" CRD Top1 (last) | Δ Top1 last |" if crd else "")
             + (" Published Top1 / Top5 (best) | Δ Top1 |" if imagenet else ""),
             "|---|---|---|---|---|" + ("---|---|" if crd or imagenet else "")]
            + model_rows(seeds, p.models + p.published, p.teacher.recipe, p.published, figure) + [""])


def distill_tables(dataset: str) -> list[tuple]:
    """The distillation tables of a benchmark: (title, our metric, reference(method, teacher, student) -> the
    published figure or None, intro)."""
    if dataset == "imagenet":  # the published table's convention (best epoch) first, then the last epoch's Top-1 and Top-5
        src = "the published figure (" + IMAGENET_CONVENTION + ", kdpipe/published.yaml gives each source)"

        def figure(column):  # the published [Top-1, Top-5] of a row of the pair's table, or None
            return lambda key, t, s: IMAGENET.get((t, s), {}).get(key, [None, None])[column]
        return [("Top-1 %, best epoch", "top1", figure(0),
                 f"Top-1 of the **best** epoch, the convention of DKD's ImageNet table; in brackets {src}."),
                ("Top-1 %, last epoch", "top1_last", lambda key, t, s: None, "Top-1 of the **last** epoch."),
                ("Top-5 %, last epoch", "top5", figure(1),
                 "Top-5 of the **last** epoch; in brackets the published best-epoch Top-5 where a source gives it.")]
    crd = dataset == "cifar100"
    return [("Top-1 %, last epoch", DISTILL_METRIC,
             lambda key, t, s: (METHOD_FIGURES[key].get((t, s)) if key in METHOD_FIGURES
                                else CRD.get((t, s), {}).get(key)) if crd else None,
             "Top-1 of the **last** epoch (`top1_last`), the convention of CRD and RepDistiller."
             + (" In brackets: the CIFAR-100 figures published by Tian et al. (CRD, ICLR 2020) for the same pair, "
                "also last epoch." if crd else ""))]


def distill_sections(p, seeds: Seeds, dataset: str, pairs: list[tuple[str, str]], cols: list[str]):
    """A table per metric convention: a row per method (teacher and baseline first), a column per pair. Returns
    its lines and the Δ Top-1 over the baseline (method -> {pair index: Δ}) of the first table."""
    # a method with a published table of its own (DKD, DIST: kdpipe/published.yaml) is compared with its figures
    # on that table's metric (DKD: mdistiller's best epoch), marked † with the table's note
    rows = p.rows()
    recipes = {r: p.varied(tag, ms).student_for(ms) for r in rows for ms, tag in [parse_run(r, p.variants)]}
    own_table = [m for m in rows if dataset == "cifar100" and m in METHOD_TABLES]
    row_specs = [("Teacher", "teacher", lambda m, t, s, seed: trained_run(p.teacher.recipe, t, seed)),
                 ("Student (baseline)", "student", lambda m, t, s, seed: trained_run(p.student.recipe, s, seed))]
    # a method whose published figures came from another recipe runs that one (`distill.<m>.train`), marked ‡
    own_recipe = [m for m in rows if recipes[m] != p.student]
    row_specs += [(label(m) + (" †" if m in own_table else "") + (" ‡" if m in own_recipe else ""), m,
                   lambda m, t, s, seed: distill_run(m, t, s, seed)) for m in rows]
    lines, deltas = [], {}
    for i, (title, table_metric, reference, intro) in enumerate(distill_tables(dataset)):
        lines += [f"## Distillation ({title})", "",
                  f"Our numbers: recipe {recipe_text(p.student)} for the students (teachers and baselines as above). "
                  + intro, "", "| Method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for row, key, name_of in row_specs:
            cells = []
            for j, (t, s) in enumerate(pairs):
                run = lambda seed: name_of(key, t, s, seed)  # noqa: E731
                metric_key = METHOD_TABLES[key]["metric"] if key in own_table else table_metric
                st = seeds.stats(run, metric_key)
                ref = reference(key, t, s)
                na = st is None and seeds.not_applicable(run)
                cells.append(("N/A" if na else fmt(st)) + (f" [{ref:.2f}]" if ref is not None else "") + seeds.mark(run))
                base = seeds.stats(lambda seed: trained_run(p.student.recipe, s, seed), metric_key)
                if i == 0 and key in rows and st and base:
                    deltas.setdefault(key, {})[j] = st[0] - base[0]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"† {label(m)}: {METHOD_TABLES[m]['note']}" for m in own_table]
    lines += [f"‡ {label(m)}: its published figures' own recipe ran, {recipe_text(recipes[m])}; its Δ is "
              "over the baseline's recipe." for m in own_recipe]
    lines += [""] if own_table or own_recipe else []
    return lines, deltas


def grid(p, manifest: Manifest, metrics_dir: Path, plots_dir: Path, out_dir: Path) -> str:
    """The full pipelines' report: a grid of models x seeds and methods x pairs x seeds."""
    dataset = manifest.dataset
    seeds = Seeds(p.seeds, metrics_dir)
    lines = [f"# kdpipe results — {dataset}", "",
             f"Data: {manifest.train_size} train / {manifest.test_size} test images, {manifest.num_classes} "
             f"classes ({manifest.source}). Seeds: {', '.join(map(str, p.seeds))}. Cells: mean ± sample std (n).", ""]
    if p.table_models:
        lines += resnet_table_section(p, seeds, dataset)
    if p.models or p.published:
        lines += baselines_section(p, seeds, dataset)
    pairs = [(pr.teacher, pr.student) for pr in p.pairs]
    cols = [f"{pretty(t)} → {pretty(s)}" for t, s in pairs]
    distill_lines, deltas = distill_sections(p, seeds, dataset, pairs, cols)
    lines += distill_lines
    lines += [f"⚠ {name}: {text}" for name, text in seeds.warned.items()] + ([""] if seeds.warned else [])
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
                       + [(label(m), distill_run(m, t, s, seed)) for m in p.rows()]))
    curves_by_pair(panels, plots_dir, out_dir / "accuracy.png", f"test Top-1 (%) per epoch, seed {seed}")
    heatmap(deltas, list(deltas), [label(m) for m in deltas], cols, out_dir / "delta.png")
    return text
