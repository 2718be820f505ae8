"""`kdpipe bench`: kdpipe's engine against the way peer repositories train, side by side in one run.

Baseline (RepDistiller/torchdistill style): a torchvision Dataset of PIL images with RandomCrop(32, 4),
RandomHorizontalFlip, ToTensor, Normalize, a DataLoader with worker processes, fp32, default memory
format. kdpipe: uint8 data on the device, batched on-device augmentation, the device's defaults
(fp32 + channels_last on a native-ISA CPU; bf16 + channels_last on CUDA); where `runtime.compile` asks, the training
cases also time kdpipe's step compiled (the engine's `runtime.wrap`; compiled in the warm-up steps, whose time is
reported). Same model, data, batch size and step count; warm-up
steps excluded; repeats interleaved (baseline, kdpipe[, compiled], baseline, ...) and the median reported.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from . import models, synthetic
from .config import METHODS, Distill, Manifest, Runtime
from .distill import Distiller, TrainData, feature_shapes
from .engine import CrossEntropy, make_optimizer, train_step
from .data import Prepared, Split
from .runtime import Ranks, context, wrap
from .sources import MemorySource


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, n_steps: int, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    _sync(device)
    return time.perf_counter() - t0


class PILDataset(torch.utils.data.Dataset):
    """CIFAR as the peers feed it: one PIL image at a time through torchvision transforms."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean, std):
        import torchvision.transforms as T

        self.images = x.permute(0, 2, 3, 1).contiguous().numpy()  # HWC uint8, like torchvision.CIFAR10
        self.labels = y.tolist()
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(mean, std)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def _train_cfg(model: str, batch_size: int, runtime: Runtime):
    from .config import Train

    return Train(model=model, batch_size=batch_size, epochs=1, runtime=runtime)


def run(model: str = "resnet20", teacher: str = "resnet56", batch_size: int = 128, steps: int = 10,
        warmup: int = 3, repeats: int = 3, workers: int = 2, runtime: Runtime = Runtime(),
        methods: tuple[str, ...] = METHODS, images: int = 4096) -> dict:
    """`runtime`: kdpipe's side (device, memory format, CPU pin), its run context (runtime.context)."""
    numerics = context(runtime).numerics
    dev = numerics.device
    (x, y), _ = synthetic.generate(10, max(images, batch_size * 4), 10, seed=0)
    mean = (x.float() / 255).mean((0, 2, 3)).tolist()
    std = (x.float() / 255).std((0, 2, 3)).tolist()
    # kdpipe's side reads batches as its engine does: from the memory source, with the views a method asks for
    manifest = Manifest(dataset="synthetic", source="kdpipe bench", num_classes=10, classes=list("0123456789"),
                        train_size=len(y), test_size=1, image_size=32, augment="cifar", storage="memory",
                        mean=mean, std=std, sha256={})
    source = MemorySource(Prepared(Split(x, y), Split(x[:1], y[:1]), manifest), numerics)
    y_dev = source.train_labels
    g = torch.Generator(device=dev).manual_seed(0)
    streams = {}

    def kdpipe_batch(views=()):
        """(x, y, idx), the next full batch of an endless run of epochs."""
        if views not in streams:
            streams[views] = (b for _ in iter(int, 1) for b in source.epoch(g, batch_size, views=views))
        while True:
            _, xb, yb, idx = next(streams[views])
            if len(yb) == batch_size:
                return xb, yb, idx

    def make(name):
        torch.manual_seed(0)
        return models.create(name, 10)

    results, timings = [], {}

    def measure(label, step, baseline_step=None, compiled_step=None):
        """Median images/s of kdpipe's `step`, and side by side, interleaved, the baseline's and kdpipe's compiled one."""
        sides = {k: f for k, f in (("baseline", baseline_step), ("kdpipe", step), ("compiled", compiled_step)) if f}
        warmup_s = dict.fromkeys(sides, 0.0)  # torch.compile's compilation happens here
        for _ in range(warmup):
            for k, f in sides.items():
                warmup_s[k] += _timed(f, 1, dev)
        rates = {k: [] for k in sides}
        for _ in range(repeats):
            for k, f in sides.items():
                rates[k].append(batch_size * steps / _timed(f, steps, dev))
        rate = {k: round(statistics.median(v), 1) for k, v in rates.items()}
        row = {"case": label, "images_per_s": rate["kdpipe"]}
        if baseline_step:
            row["baseline_images_per_s"] = rate["baseline"]
            row["speedup"] = round(rate["kdpipe"] / rate["baseline"], 2)
        if compiled_step:
            row["compiled_images_per_s"] = rate["compiled"]
            row["compiled_speedup"] = round(rate["compiled"] / rate["baseline"], 2)
            row["compile_seconds"] = round(warmup_s["compiled"], 1)
        timings[label] = batch_size / row["images_per_s"]  # seconds per step
        results.append(row)

    def baseline_trainer(name):
        m = make(name).to(dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        loader = torch.utils.data.DataLoader(PILDataset(x, y, mean, std), batch_size=batch_size, shuffle=True,
                                             num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                                             pin_memory=dev.type == "cuda")
        it = iter(loader)

        def step():
            nonlocal it
            try:
                xb, yb = next(it)
            except StopIteration:
                it = iter(loader)
                xb, yb = next(it)
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            loss = F.cross_entropy(m(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def kdpipe_trainer(name, objective=None, mode=False):
        m, forward_model = wrap(make(name), Ranks(), numerics, mode, False, False)
        objective = (objective or CrossEntropy()).to(dev)
        opt = make_optimizer(list(m.parameters()) + list(objective.parameters()), _train_cfg(name, batch_size, runtime), dev,
                             objective.optimizer("main"))

        def step():
            xb, yb, idx = kdpipe_batch(objective.views)
            train_step(objective, forward_model, opt, xb, yb, "main", numerics, 0.1, index=idx, epoch=100)
        return step, m

    def compiled_trainer(name):
        return kdpipe_trainer(name, mode=runtime.compile)[0] if runtime.compile else None

    # teacher training, plain student training: baseline vs kdpipe (and kdpipe compiled, where runtime.compile asks)
    measure(f"train {teacher} (teacher)", kdpipe_trainer(teacher)[0], baseline_trainer(teacher), compiled_trainer(teacher))
    student_step, student = kdpipe_trainer(model)
    measure(f"train {model} (student)", student_step, baseline_trainer(model), compiled_trainer(model))

    # the teacher's inference forward alone: the only extra work a distillation step should have
    t_model = numerics.prepare_model(make(teacher)).eval().requires_grad_(False)

    def teacher_forward():
        xb, _, _ = kdpipe_batch()
        with torch.inference_mode(), numerics.autocast():
            t_model(xb, features=True)
    measure(f"{teacher} inference forward", teacher_forward)
    floor = timings[f"train {model} (student)"] + timings[f"{teacher} inference forward"]
    for method in methods:
        s = make(model)
        try:
            objective = Distiller(t_model, [method], Distill(), feature_shapes(s), feature_shapes(t_model, dev),
                                  TrainData(y_dev))
        except ValueError as e:  # a method this pair does not admit (FSP across widths): a row that says so
            results.append({"case": f"distill {method}: {teacher} -> {model}", "not_applicable": str(e)})
            continue
        step, _ = kdpipe_trainer(model, objective)
        measure(f"distill {method}: {teacher} -> {model}", step)
        results[-1]["vs_student_plus_teacher_forward"] = round(timings[results[-1]["case"]] / floor, 2)
        step_case = results[-1]["case"]
        for part, part_step in objective.terms[method].bench_parts(batch_size, lambda: kdpipe_batch()[2], dev).items():
            measure(f"{method} {part}", part_step)
            results[-1][f"share_of_{method}_step"] = round(timings[results[-1]["case"]] / timings[step_case], 2)
    cpu = f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu,
            "torch": torch.__version__, "bf16": numerics.bf16, "channels_last": numerics.channels_last,
            "compile": runtime.compile,
            "batch_size": batch_size, "images": len(y), "steps": steps, "warmup": warmup, "repeats": repeats, "workers": workers,
            "results": results}


def print_table(out: dict, batch_size: int, repeats: int, steps: int) -> None:
    """`run`'s results as a table on the terminal (rich), then a line per case that is not applicable."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kdpipe bench — {out['device']}, torch {out['torch']}, batch {batch_size}, {out['images']} images, "
                        f"median of {repeats} x {steps} steps")
    columns = {"kdpipe img/s": ("images_per_s", "{:.0f}"), "baseline img/s": ("baseline_images_per_s", "{:.0f}"),
               "speed-up": ("speedup", "{:.2f}x")}
    if out["compile"]:
        columns.update({"compiled img/s": ("compiled_images_per_s", "{:.0f}"),
                        "compiled speed-up": ("compiled_speedup", "{:.2f}x"), "compile s": ("compile_seconds", "{:.0f}")})
    columns["÷ (student step + teacher fwd)"] = ("vs_student_plus_teacher_forward", "{:.2f}")
    table.add_column("case")
    for col in columns:
        table.add_column(col, justify="right")
    for r in out["results"]:
        if "not_applicable" in r:
            table.add_row(r["case"], "N/A", *[""] * (len(columns) - 1))
            continue
        table.add_row(r["case"], *(fmt.format(r[key]) if key in r else "" for key, fmt in columns.values()))
    Console().print(table)
    for r in out["results"]:
        if "not_applicable" in r:
            print(f"N/A: {r['case']}: {r['not_applicable']}")
