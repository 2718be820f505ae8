"""The one training loop shared by teachers, student baselines and distilled students.

Design: the prepared uint8 arrays live on the training device; every batch is cropped, flipped and
normalised there in a few batched tensor ops (no DataLoader, no worker processes). One
`torch.Generator` on the device, seeded from the config, drives shuffling and augmentation, and
`torch.manual_seed(seed)` drives initialisation, so a run is a pure function of its params: on the CPU
two runs are bit-identical. After every epoch the full training state is written atomically to
`<out>.resume`; re-running the same command resumes from it and ends bit-identical to an
uninterrupted run. The final `<out>` holds weights, config and history, and no wall-clock times
(those go to the separate log JSON), so reruns produce byte-identical checkpoints.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import Error, Train
from .data import Prepared, Split
from .losses import cross_entropy
from .models import count_params_m

FORMAT = "kdpipe-checkpoint/1"


class TrainingError(Error):
    pass


class CheckpointError(Error):
    pass


# --- device and numerics --------------------------------------------------------------------------
def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {spec!r} requested but CUDA is not available")
    return torch.device(spec)


def _switch(value: str, device: torch.device) -> bool:
    """`auto` means on for CUDA and off for CPU, so CPU results stay exact fp32 and comparable."""
    return device.type == "cuda" if value == "auto" else value == "on"


@dataclass(frozen=True)
class Numerics:
    device: torch.device
    bf16: bool
    channels_last: bool

    @classmethod
    def from_runtime(cls, runtime, local_rank: int = 0) -> "Numerics":
        device = resolve_device(runtime.device)
        if device.type == "cuda" and device.index is None and local_rank:  # one GPU per DDP rank
            device = torch.device("cuda", local_rank)
        return cls(device, _switch(runtime.bf16, device), _switch(runtime.channels_last, device))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"}


def pin_cpu(cfg) -> None:
    """Apply `runtime.cpu_isa` / `cpu_threads` (config.CpuPin). Must run before the process's first
    torch op: ATen and oneDNN read their instruction-set limits once, at first use."""
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    if cfg.cpu_isa == "native":
        return
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise TrainingError(f"cpu_isa: {cfg.cpu_isa} needs an x86-64 CPU (this is {platform.machine()}); use native")
    os.environ.update(AVX2_ENV)
    got = torch.backends.cpu.get_cpu_capability()
    if got != "AVX2":
        raise TrainingError(f"cpu_isa: avx2 requested but torch runs {got} kernels in this process "
                            "(a CPU without AVX2, or torch ops ran before kdpipe could pin the ISA)")


def set_determinism(device: torch.device) -> None:
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:  # on CUDA we prefer cuDNN autotuning: fast, reproducible in distribution but not bitwise
        torch.backends.cudnn.benchmark = True


# --- batched augmentation on the device -----------------------------------------------------------
class Pipeline:
    """uint8 images -> normalised float batches, with random crop (pad 4) + flip for training."""

    def __init__(self, manifest: dict, numerics: Numerics):
        dev = numerics.device
        self.mean = torch.tensor(manifest["mean"], device=dev).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(manifest["std"], device=dev).view(1, 3, 1, 1) * 255
        self.numerics = numerics
        self.offsets = torch.arange(32, device=dev)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return self.numerics.layout((x.float() - self.mean) / self.std)

    def augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, dev = x.shape[0], x.device
        padded = F.pad(x, (4, 4, 4, 4))
        dy = torch.randint(0, 9, (b, 1), generator=g, device=dev) + self.offsets
        dx = torch.randint(0, 9, (b, 1), generator=g, device=dev) + self.offsets
        flip = torch.rand(b, generator=g, device=dev) < 0.5
        dx = torch.where(flip[:, None], dx.flip(1), dx)  # a flip is a reversed column index
        rows = padded.gather(2, dy[:, None, :, None].expand(b, 3, 32, 40))
        crop = rows.gather(3, dx[:, None, None, :].expand(b, 3, 32, 32))
        return self.normalise(crop)


# --- multi-GPU: DistributedDataParallel under torchrun -----------------------------------------------
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process (the default) needs nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_sum(t: torch.Tensor, ddp: Dist) -> torch.Tensor:
    if ddp.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def barrier(ddp: Dist) -> None:
    if ddp.world > 1:
        import torch.distributed as dist

        dist.barrier()


def train_step(objective: nn.Module, model: nn.Module, optimizer, x, y, phase: str, numerics: "Numerics",
               lr: float, ddp: Dist = Dist(), index=None, epoch: int = 0):
    """One optimisation step (shared by `train` and `kdpipe bench`). `index` (each sample's position in
    the training set) and `epoch` (of the phase, from 0) reach the objective for methods that use them."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with numerics.autocast():
        loss, logits = objective(model, x, y, phase, index=index, epoch=epoch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if ddp.world > 1:  # DDP syncs the model's gradients; the objective's own (regressor) ones we sync here
        for p in objective.parameters():
            if p.grad is not None:
                all_sum(p.grad, ddp).div_(ddp.world)
    optimizer.step()
    return loss, logits


# --- learning rate --------------------------------------------------------------------------------
def learning_rate(cfg: Train, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Multi-step decay at fractions of training, after an optional linear warm-up (per step)."""
    s = cfg.schedule
    lr = cfg.lr * s.gamma ** sum(epoch >= round(m * cfg.epochs) for m in s.milestones)
    if epoch < s.warmup_epochs:
        lr *= (epoch * steps_per_epoch + step + 1) / (s.warmup_epochs * steps_per_epoch)
    return lr


def make_optimizer(params, cfg: Train, device: torch.device) -> torch.optim.SGD:
    o = cfg.optim
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(params, lr=cfg.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov and o.momentum > 0, **fast)


# --- evaluation -----------------------------------------------------------------------------------
def evaluate(model: nn.Module, split: Split, pipe: Pipeline, batch_size: int = 1000) -> dict:
    """Test loss, Top-1 and Top-5 (%) in inference mode, always in fp32 (never under bf16 autocast), so
    the per-epoch test accuracy that picks the best epoch equals what `kdpipe evaluate` measures."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=split.x.device)
    top1 = torch.zeros((), device=split.x.device, dtype=torch.long)
    top5 = torch.zeros_like(top1)
    with torch.inference_mode():
        for i in range(0, len(split.y), batch_size):
            x, y = pipe.normalise(split.x[i:i + batch_size]), split.y[i:i + batch_size]
            logits = model(x)
            loss += F.cross_entropy(logits, y, reduction="sum")
            k = min(5, logits.shape[1])
            hits = logits.topk(k, 1).indices == y[:, None]
            top1 += hits[:, 0].sum()
            top5 += hits.any(1).sum()
    model.train(was_training)
    n = len(split.y)
    return {"test_loss": loss.item() / n, "test_top1": 100 * top1.item() / n, "test_top5": 100 * top5.item() / n}


# --- objectives -----------------------------------------------------------------------------------
class CrossEntropy(nn.Module):
    """The plain objective of teachers and student baselines. Distillation objectives share this
    interface: `forward(model, x, y, phase) -> (loss, logits)`; their own trainable modules (e.g. a
    FitNets regressor) are submodules, so they are optimised and checkpointed with the model."""

    phases = ("main",)

    def forward(self, model, x, y, phase: str = "main", index=None, epoch: int = 0):
        logits = model(x)
        return cross_entropy(logits, y), logits

    def init_epochs(self) -> int:
        return 0

    def trainable(self, model: nn.Module, phase: str) -> list[nn.Parameter]:
        return list(model.parameters())


# --- checkpoints ----------------------------------------------------------------------------------
def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a file completely or not at all (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj, path: Path) -> None:
    buf = io.BytesIO()  # torch.save names the archive after a file; a buffer keeps bytes path-independent
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def check_writable(*folders: Path) -> None:
    """Fail before training, not after the first epoch, when an output folder cannot be written."""
    for d in folders:
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=d):
                pass
        except OSError as e:
            raise TrainingError(f"{d}: cannot write outputs there ({e.strerror or type(e).__name__})") from None


def timing_path(log: Path) -> Path:
    """logs/NAME.timing.json: wall-clock figures, kept out of DVC-tracked outputs so that re-running a
    stage by hand leaves `dvc status` clean (logs/NAME.json itself is deterministic)."""
    return log.with_name(log.stem + ".timing.json")


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_weights(path: Path, error: type[Exception] | None = None):
    """`torch.load(path, weights_only=True)` on the CPU (a file cannot run code), failing with one line."""
    error = error or CheckpointError
    if not path.is_file():
        raise error(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise error(f"{path}: not a readable checkpoint ({type(e).__name__})") from None


def write_not_applicable(out: Path, log: Path, model: str, num_classes: int, reason: str, meta: dict) -> None:
    """The record of a run that cannot exist (a method a teacher/student pair does not admit, as RepDistiller's
    N/A cells): a checkpoint without weights, so the pipelines' grid has its file and the report says N/A."""
    atomic_save({"format": FORMAT, "model": model, "num_classes": num_classes, "not_applicable": reason,
                 "meta": meta}, out)
    atomic_write(log, json.dumps({"name": out.stem, "model": model, **meta, "not_applicable": reason}, indent=2) + "\n")


def load_checkpoint(path: str | Path, model_name: Optional[str] = None, num_classes: Optional[int] = None,
                    allow_not_applicable: bool = False) -> dict:
    """Load a final kdpipe checkpoint safely (weights_only), checking it holds the expected model."""
    path = Path(path)
    ckpt = read_weights(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a kdpipe checkpoint")
    if "not_applicable" in ckpt and not allow_not_applicable:
        raise CheckpointError(f"{path}: holds no model (not applicable: {ckpt['not_applicable']})")
    got = (ckpt["model"], ckpt["num_classes"])
    want = (model_name or got[0], num_classes or got[1])
    if got != want:
        raise CheckpointError(f"{path}: holds {got[0]} with {got[1]} classes, expected {want[0]} with {want[1]} classes")
    return ckpt


def renormalisation(manifest: dict, normalization: Optional[dict], device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(scale, shift) turning inputs normalised with the data's statistics into inputs normalised with a
    checkpoint's own (an imported teacher's); None where they agree."""
    if not normalization or (normalization["mean"], normalization["std"]) == (manifest["mean"], manifest["std"]):
        return None
    view = (1, 3, 1, 1)
    md, sd = (torch.tensor(manifest[k], device=device).view(view) for k in ("mean", "std"))
    mt, st = (torch.tensor(normalization[k], device=device).view(view) for k in ("mean", "std"))
    return sd / st, (md - mt) / st


def restore_model(ckpt: dict) -> nn.Module:
    from .models import create

    model = create(ckpt["model"], ckpt["num_classes"])
    model.load_state_dict(ckpt["state_dict"])
    return model


# --- progress -------------------------------------------------------------------------------------
class Reporter:
    """rich progress bar on a terminal, one plain line per epoch otherwise (DVC logs, CI)."""

    def __init__(self, name: str, total_epochs: int, steps: int, enabled: bool = True):
        self.name, self.total = name, total_epochs
        self.live = enabled and sys.stderr.isatty()
        self.progress = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.progress.start()
            self.task = self.progress.add_task(name, total=total_epochs * steps, info="")

    def step(self):
        if self.progress:
            self.progress.advance(self.task)

    def epoch(self, row: dict, ips: float):
        # an init-stage epoch is not tested (the student is not trained for the task yet): no test columns
        test = (f"test {row['test_top1']:.2f}% top5 {row['test_top5']:.2f}% " if "test_top1" in row else "")
        line = (f"epoch {row['epoch']}/{self.total} [{row['phase']}] lr {row['lr']:.4g} loss {row['train_loss']:.4f} "
                f"train {row['train_top1']:.2f}% {test}{ips:.0f} img/s")
        if self.progress:
            self.progress.update(self.task, info=f"loss {row['train_loss']:.3f} test {row.get('test_top1', 0):.1f}%")
            self.progress.console.print(f"{self.name}: {line}")
        else:
            print(f"{self.name}: {line}", file=sys.stderr, flush=True)

    def close(self):
        if self.progress:
            self.progress.stop()


# --- the loop -------------------------------------------------------------------------------------
@dataclass
class Run:
    """What to train and where the results go."""

    name: str                      # shown in logs, e.g. "teacher"
    model: nn.Module
    cfg: Train
    out: Path                      # final checkpoint
    log: Path                      # timings JSON (kept out of the checkpoint)
    objective: nn.Module = field(default_factory=CrossEntropy)
    meta: dict = field(default_factory=dict)  # stored in the checkpoint and in the fingerprint
    stop_after: Optional[int] = None          # testing hook: pretend an interruption after this epoch
    # (also settable as env KDPIPE_STOP_AFTER, to interrupt whole processes, e.g. under torchrun)
    progress: bool = True


def train(run: Run, data: Prepared) -> dict:
    cfg = run.cfg
    ddp = init_distributed()
    numerics = Numerics.from_runtime(cfg.runtime, ddp.local_rank)
    dev = numerics.device
    set_determinism(dev)
    data = data.to(dev)
    pipe = Pipeline(data.manifest, numerics)
    model = run.model
    if ddp.world > 1 and cfg.runtime.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = numerics.prepare_model(model)
    objective = run.objective.to(dev)
    forward_model = model
    if ddp.world > 1:
        if cfg.batch_size % ddp.world:
            raise TrainingError(f"batch_size {cfg.batch_size} is not divisible by the {ddp.world} processes")
        from torch.nn.parallel import DistributedDataParallel

        forward_model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                find_unused_parameters=objective.init_epochs() > 0)
    if cfg.runtime.compile:
        forward_model = torch.compile(forward_model)

    def params(phase: str) -> list[nn.Parameter]:  # what the objective says trains in this phase
        return [p for p in objective.trainable(model, phase) if p.requires_grad]

    if ddp.main:
        check_writable(run.out.parent, run.log.parent)
    n = len(data.train.y)
    steps = math.ceil(n / cfg.batch_size)
    init_epochs = objective.init_epochs()
    total = init_epochs + cfg.epochs
    resume_path = run.out.with_name(run.out.name + ".resume")
    fp = fingerprint(cfg.model_dump(), run.meta, data.manifest["sha256"], dev.type, numerics.bf16,
                     numerics.channels_last, ddp.world)

    g = torch.Generator(device=dev).manual_seed(cfg.seed)
    history: list[dict] = []
    start, seconds, opt_phase = 0, 0.0, None
    optimizer = None
    state = _read_resume(resume_path, fp)
    if state is not None:
        model.load_state_dict(state["model"])
        objective.load_state_dict(state["objective"])
        g.set_state(state["generator"])
        history, start, seconds = state["history"], state["epoch"], state["seconds"]
        opt_phase = state["opt_phase"]
        optimizer = make_optimizer(params(opt_phase), cfg, dev)
        optimizer.load_state_dict(state["optimizer"])
        if ddp.main:
            print(f"{run.name}: resuming after epoch {start}/{total} from {resume_path}", file=sys.stderr)

    compile_seconds = 0.0
    if cfg.runtime.compile and start < total:
        compile_seconds = _compile_warmup(objective, forward_model, model, data, pipe, cfg, init_epochs > start)

    reporter = Reporter(run.name, total, steps, run.progress and ddp.main)
    try:
        for epoch in range(start, total):
            phase = "init" if epoch < init_epochs else "main"
            if opt_phase != phase:  # each phase starts with a fresh optimizer (FitNets/FSP stage 1 -> 2)
                optimizer, opt_phase = make_optimizer(params(phase), cfg, dev), phase
            e = epoch - init_epochs if phase == "main" else epoch
            t0 = time.perf_counter()
            model.train()
            objective.train()
            perm = torch.randperm(n, generator=g, device=dev)
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), device=dev, dtype=torch.long)
            lr, seen = cfg.lr, 0
            for step in range(steps):
                idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                idx = idx[:len(idx) - len(idx) % ddp.world]  # equal shards for every rank
                if len(idx) < 2 * ddp.world:  # BatchNorm cannot train on a single image
                    continue
                seen += len(idx)
                # every rank augments the whole global batch with the shared generator, then takes its
                # shard: the random streams stay in step and the augmentation equals a single process's
                x, y, index = pipe.augment(data.train.x[idx], g), data.train.y[idx], idx
                if ddp.world > 1:
                    x, y, index = x[ddp.rank::ddp.world], y[ddp.rank::ddp.world], index[ddp.rank::ddp.world]
                lr = learning_rate(cfg, e, step, steps) if phase == "main" else cfg.lr
                loss, logits = train_step(objective, forward_model, optimizer, x, y, phase, numerics, lr, ddp,
                                          index=index, epoch=e)
                loss_sum += loss.detach().float() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                reporter.step()
            all_sum(loss_sum, ddp)
            all_sum(correct, ddp)
            train_loss = loss_sum.item() / seen
            if not math.isfinite(train_loss):
                raise TrainingError(f"{run.name}: loss became {train_loss} in epoch {epoch + 1}; "
                                    "lower the learning rate or a loss weight")
            row = {"epoch": epoch + 1, "phase": phase, "lr": lr, "train_loss": train_loss,
                   "train_top1": 100 * correct.item() / seen}
            if phase == "main":
                row.update(evaluate(model, data.test, pipe))
            dt = time.perf_counter() - t0
            seconds += dt
            history.append(row)
            if ddp.main:
                reporter.epoch(row, n / dt)
                atomic_save({"fingerprint": fp, "epoch": epoch + 1, "model": model.state_dict(),
                             "objective": objective.state_dict(), "optimizer": optimizer.state_dict(),
                             "opt_phase": opt_phase, "generator": g.get_state(), "history": history,
                             "seconds": seconds}, resume_path)
            barrier(ddp)  # the other ranks wait until the epoch's checkpoint is safely written
            stop_after = run.stop_after or int(os.environ.get("KDPIPE_STOP_AFTER", "0")) or None
            if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < total:
                raise KeyboardInterrupt(f"stopped after epoch {epoch + 1} (test hook)")
    finally:
        reporter.close()

    # JSON round-trip: equal values pickle to equal bytes whether or not they came from a resume state
    canonical = json.loads(json.dumps({"history": history, "meta": run.meta}))
    final = {
        "format": FORMAT,
        "model": cfg.model,
        "num_classes": data.num_classes,
        "params_m": count_params_m(model),
        "state_dict": {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()},
        "config": cfg.model_dump(mode="json"),
        "meta": canonical["meta"],
        "dataset": data.manifest["dataset"],
        "data_sha256": data.manifest["sha256"],
        # input normalisation (RGB, images scaled to 0..1): a checkpoint alone is enough to run the model
        "normalization": {"mean": data.manifest["mean"], "std": data.manifest["std"]},
        "history": canonical["history"],
    }
    if not ddp.main:  # only rank 0 writes checkpoints, metrics and logs
        barrier(ddp)
        return final
    atomic_save(final, run.out)
    log = {"name": run.name, "model": cfg.model, **run.meta, "device": str(dev), "bf16": numerics.bf16,
           "channels_last": numerics.channels_last, "torch": torch.__version__, "world_size": ddp.world}
    timing = {"seconds": round(seconds, 3), "images_per_s": round(n * total / max(seconds, 1e-9), 1),
              "compile_seconds": round(compile_seconds, 3)}
    atomic_write(run.log, json.dumps(log, indent=2) + "\n")
    atomic_write(timing_path(run.log), json.dumps(timing, indent=2) + "\n")
    resume_path.unlink(missing_ok=True)
    barrier(ddp)
    return final


def _compile_warmup(objective, forward_model, model, data, pipe, cfg, init_phase: bool) -> float:
    """Trigger torch.compile's compilation before the timed epochs, without changing the run: one
    forward/backward on a batch drawn from a separate generator, then weights, BN statistics and
    gradients are put back exactly as they were."""
    t0 = time.perf_counter()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_obj = {k: v.clone() for k, v in objective.state_dict().items()}
    g = torch.Generator(device=data.train.x.device).manual_seed(0)
    idx = torch.randperm(len(data.train.y), generator=g, device=data.train.x.device)[:cfg.batch_size]
    model.train()
    objective.train()
    for phase in (("init", "main") if init_phase else ("main",)):
        with pipe.numerics.autocast():
            loss, _ = objective(forward_model, pipe.augment(data.train.x[idx], g), data.train.y[idx], phase, index=idx)
        loss.backward()
    model.load_state_dict(saved)
    objective.load_state_dict(saved_obj)
    for p in list(model.parameters()) + list(objective.parameters()):
        p.grad = None
    if pipe.numerics.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _read_resume(path: Path, fp: str) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        print(f"ignoring unreadable resume state {path}", file=sys.stderr)
        return None
    if state.get("fingerprint") != fp:
        print(f"ignoring resume state {path}: it belongs to other params", file=sys.stderr)
        return None
    return state
