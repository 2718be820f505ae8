"""The one training loop shared by teachers, student baselines and distilled students.

A run is a pure function of its params: one `torch.Generator`, seeded from the config, drives shuffling
and augmentation (through the data source, kdpipe/sources.py), `torch.manual_seed(seed)` drives
initialisation and the process's default generators (Dropout, drop-path), so on the CPU two runs are
bit-identical. After every epoch the full training state, the default generators' states included, is
written atomically to `<out>.resume`; re-running the same command resumes from it and ends bit-identical
to an uninterrupted run (kdpipe/checkpoint.py). Device, numerics and DDP: the run context (kdpipe/runtime.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt_io
from .config import Train
from .losses import cross_entropy
from .progress import Reporter
from .runtime import Context, Ranks, Numerics, TrainingError, all_sum, barrier, compiled_graphs, context, wrap
from .sources import MemorySource, shard_sizes


def learning_rate(cfg: Train, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Multi-step decay at fractions of training, after an optional linear warm-up (per step)."""
    s = cfg.schedule
    lr = cfg.lr * s.gamma ** sum(epoch >= round(m * cfg.epochs) for m in s.milestones)
    if epoch < s.warmup_epochs:
        lr *= (epoch * steps_per_epoch + step + 1) / (s.warmup_epochs * steps_per_epoch)
    return lr


def make_optimizer(params, cfg: Train, device: torch.device, custom=None) -> torch.optim.Optimizer:
    """SGD as `cfg.optim` says, or the optimiser a method brings, `custom(params, cfg)`."""
    if custom is not None:
        return custom(params, cfg)
    o = cfg.optim
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if o.no_decay == "norm_and_bias":  # 1-D parameters apart, without decay (image_classification_sota's filter)
        params = list(params)
        params = [{"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0},
                  {"params": [p for p in params if p.ndim != 1]}]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov and o.momentum > 0, **fast)


def train_step(objective: nn.Module, model: nn.Module, optimizer, x, y, phase: str, numerics: Numerics,
               lr: float, ddp: Ranks = Ranks(), index=None, epoch: int = 0):
    """One optimisation step (shared by `train` and `kdpipe bench`). `index` (each sample's position in
    the training set) and `epoch` (of the phase, from 0) reach the objective for methods that use them.
    An optimiser with a `backward(terms)` (a method's own) runs the backward passes itself, from the
    loss's named terms; `step()` follows either way."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if numerics.device.type == "cuda":  # a new step for CUDA graphs (runtime.compile: reduce-overhead): the last
        torch.compiler.cudagraph_mark_step_begin()  # step's graphed outputs are not read again
    with numerics.autocast():
        loss, logits, terms = objective(model, x, y, phase, index=index, epoch=epoch)
    optimizer.zero_grad(set_to_none=True)
    own_backward = getattr(optimizer, "backward", None)
    if own_backward is not None:
        loss = own_backward(terms)
    else:
        loss.backward()
    if ddp.world > 1:  # DDP syncs the model's gradients; the objective's own (regressor) ones we sync here
        for p in objective.parameters():
            if p.grad is not None:
                all_sum(p.grad, ddp).div_(ddp.world)
    optimizer.step()
    return loss, logits, terms


TOP5_MIN_CLASSES = 6  # Top-5 of 5 classes or fewer is 100 % whatever the model: not measured there


def evaluate(model: nn.Module, batches: Iterable, counts: bool = False) -> dict:
    """Test loss, Top-1 and, with more than 5 classes, Top-5 (%) over normalised `(x, y)` batches in inference
    mode, always in fp32 (never under bf16 autocast), so the per-epoch test accuracy that picks the best epoch
    equals what `kdpipe evaluate` measures. `counts`: also how often each class is predicted and is the label
    (`predicted`, `labels`: lists per class), for `kdpipe evaluate`'s collapse check."""
    was_training = model.training
    model.eval()
    loss, top1, top5, n, classes = 0.0, 0, 0, 0, 0
    predicted = labels = 0
    with torch.inference_mode():
        for x, y in batches:
            logits = model(x)
            classes = logits.shape[1]
            loss = loss + F.cross_entropy(logits, y, reduction="sum")
            hits = logits.topk(min(5, classes), 1).indices == y[:, None]
            top1, top5, n = top1 + hits[:, 0].sum(), top5 + hits.any(1).sum(), n + len(y)
            if counts:
                predicted = predicted + torch.bincount(logits.argmax(1), minlength=classes)
                labels = labels + torch.bincount(y, minlength=classes)
    model.train(was_training)
    out = {"test_loss": float(loss) / n, "test_top1": 100 * int(top1) / n}
    if classes >= TOP5_MIN_CLASSES:
        out["test_top5"] = 100 * int(top5) / n
    if counts:
        out.update(predicted=predicted.tolist(), labels=labels.tolist())
    return out


class CrossEntropy(nn.Module):
    """The plain objective of teachers and student baselines. Distillation objectives share this
    interface: `forward(model, x, y, phase) -> (loss, logits, terms)` (x: a batch, or a tuple of views where `views`
    asks for more than one; terms: the loss's named parts, which the run's history records per epoch as
    `loss_<name>`); their own trainable modules (e.g. a
    method's regressor) are submodules, so they are optimised and checkpointed with the model."""

    phases = ("main",)
    views = ()  # the extra views of each batch it needs from the source (kdpipe/sources.py)
    runs_eager = ""  # why the model cannot run under runtime.compile ("": it can)

    def forward(self, model, x, y, phase: str = "main", index=None, epoch: int = 0):
        logits = model(x)
        loss = cross_entropy(logits, y)
        return loss, logits, {"ce": loss}

    def init_epochs(self) -> int:
        return 0

    def trainable(self, model: nn.Module, phase: str) -> list[nn.Parameter]:
        return list(model.parameters())

    def optimizer(self, phase: str):
        return None  # SGD


@dataclass
class Run:
    """What to train and where the results go."""

    name: str                      # shown in logs, e.g. "teacher"
    model: nn.Module
    cfg: Train
    out: Path                      # final checkpoint
    log: Path                      # run log JSON (timings apart, kept out of the checkpoint)
    objective: nn.Module = field(default_factory=CrossEntropy)
    meta: dict = field(default_factory=dict)  # stored in the checkpoint and in the fingerprint
    stop_after: Optional[int] = None          # testing hook: pretend an interruption after this epoch
    # (also settable as env KDPIPE_STOP_AFTER, to interrupt whole processes, e.g. under torchrun)
    progress: bool = True
    # the process's random streams (checkpoint.random_streams) as building this run left them, where other runs were
    # built after it (a group); None: the process's own
    streams: Optional[dict] = None


def train(run: Run, source, ctx: Optional[Context] = None) -> dict:
    """Train `run.model` on `source` (a kdpipe/sources.py source opened in `ctx`, or prepared data for a
    MemorySource) in the run context `ctx` (runtime.context of the run's params when not given)."""
    return train_group([run], source, ctx)[0]


class _Student:
    """One run of a group: its model, objective, optimiser, history, resume file and its own default random
    streams (Dropout, a term's sampler), swapped in around its work so each run draws what it would alone."""

    def __init__(self, run: Run, ctx: Context, source):
        cfg, ddp, numerics = run.cfg, ctx.dist, ctx.numerics
        self.run, self.dev = run, numerics.device
        self.objective = run.objective.to(self.dev)
        self.init_epochs = self.objective.init_epochs()
        self.total = self.init_epochs + cfg.epochs
        # runtime.compile, unless the objective says why its model cannot run compiled (then eager, logged)
        self.runs_eager = self.objective.runs_eager if cfg.runtime.compile else ""
        if self.runs_eager and ddp.main:
            print(f"{run.name}: the model runs eager, not compiled: {self.runs_eager}", file=sys.stderr)
        mode = False if self.runs_eager else cfg.runtime.compile
        self.model, self.forward_model = wrap(run.model, ddp, numerics, mode, cfg.runtime.sync_bn,
                                              self.init_epochs > 0)
        if ddp.main:
            ckpt_io.check_writable(run.out.parent, run.log.parent, error=TrainingError)
        self.resume_path = ckpt_io.resume_path(run.out)
        self.fp = ckpt_io.fingerprint(ckpt_io.RESUME_FORMAT, cfg.model_dump(), run.meta, source.manifest.sha256,
                                      self.dev.type, numerics.bf16, numerics.channels_last, ddp.world)
        self.history, self.start, self.seconds, self.opt_phase, self.optimizer = [], 0, 0.0, None, None
        self.generator_state = None  # the shared data generator's state at this run's resume point
        self.streams = None  # its random streams while another run of the group works (None: alone)
        self.recompilations = 0  # graphs torch.compile built during its epochs (the warm-up builds them all: 0)

    def params(self, phase: str) -> list[nn.Parameter]:  # what the objective says trains in this phase
        return [p for p in self.objective.trainable(self.model, phase) if p.requires_grad]

    def resume(self, ddp: Ranks) -> None:
        state = ckpt_io.read_resume(self.resume_path, self.fp)
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.objective.load_state_dict(state["objective"])
        self.generator_state = state["generator"]
        ckpt_io.restore_random_streams(state["random"], self.dev)
        self.history, self.start, self.seconds = state["history"], state["epoch"], state["seconds"]
        self.opt_phase = state["opt_phase"]
        self.optimizer = make_optimizer(self.params(self.opt_phase), self.run.cfg, self.dev,
                                        self.objective.optimizer(self.opt_phase))
        self.optimizer.load_state_dict(state["optimizer"])
        if ddp.main:
            print(f"{self.run.name}: resuming after epoch {self.start}/{self.total} from {self.resume_path}",
                  file=sys.stderr)

    @contextlib.contextmanager
    def own_streams(self):
        if self.streams is None:  # alone: the process's streams are this run's
            yield
            return
        ckpt_io.restore_random_streams(self.streams, self.dev)
        try:
            yield
        finally:
            self.streams = ckpt_io.random_streams(self.dev)


def train_group(runs: list[Run], source, ctx: Optional[Context] = None) -> list[dict]:
    """Train runs of one recipe (the same `Train` section: batches, schedule, seed) on the same batches: one data
    pass, and for distilled students one teacher forward per batch and teacher mode (their objectives share a
    `TeacherPass`). Each run draws its own random streams, as it would alone (each was built right after
    `torch.manual_seed(seed)`, and the streams it left then are its own), so each run's checkpoint, metrics and log
    equal those of training it alone, byte for byte on the CPU. Returns each run's final checkpoint."""
    cfg = runs[0].cfg
    if any(r.cfg != cfg for r in runs):
        raise ValueError("a group's runs must share one training recipe (the Train section)")
    ctx = ctx or context(cfg.runtime)
    ddp, numerics = ctx.dist, ctx.numerics
    dev = numerics.device
    if not hasattr(source, "epoch"):
        source = MemorySource(source, numerics)
    if ddp.world > 1 and cfg.batch_size % ddp.world:
        raise TrainingError(f"batch_size {cfg.batch_size} is not divisible by the {ddp.world} processes")
    views = runs[0].objective.views
    if any(r.objective.views != views for r in runs):
        raise ValueError("a group's runs must ask for the same views of each batch")
    if len(runs) > 1 and ddp.world > 1:
        raise TrainingError("a group of runs trains in one process (not under torchrun)")
    # each run's streams as its builder left them (None: the process's, as the last one built left them)
    built = [ckpt_io.random_streams(dev) if r.streams is None else r.streams for r in runs]
    students = [_Student(r, ctx, source) for r in runs]
    for s, streams in zip(students, built):
        if len(students) > 1:
            ckpt_io.restore_random_streams(streams, dev)
        s.resume(ddp)
        if len(students) > 1:
            s.streams = ckpt_io.random_streams(dev)
    steps = source.steps(cfg.batch_size)
    # the data pass restarts where the run furthest behind stopped; runs already past an epoch skip it
    first = min(students, key=lambda s: s.start)
    g = torch.Generator(device=dev).manual_seed(cfg.seed)
    if first.generator_state is not None:
        g.set_state(first.generator_state)
    compile_seconds = {}
    for s in students:
        with s.own_streams():
            compile_seconds[s.run.name] = (_compile_warmup(s.objective, s.forward_model, s.model, source, cfg,
                                                           s.init_epochs > s.start, ddp)
                                           if cfg.runtime.compile and s.start < s.total else 0.0)
    reporters = {s.run.name: Reporter(s.run.name, s.total, steps, s.run.progress and ddp.main and len(runs) == 1)
                 for s in students}
    try:
        for epoch in range(first.start, max(s.total for s in students)):
            active = [s for s in students if s.start <= epoch < s.total]
            t0 = time.perf_counter()
            sums = {}
            for s in active:
                phase = "init" if epoch < s.init_epochs else "main"
                if s.opt_phase != phase:  # each phase starts with a fresh optimizer (init stage -> main)
                    s.optimizer = make_optimizer(s.params(phase), cfg, dev, s.objective.optimizer(phase))
                    s.opt_phase = phase
                s.model.train()
                s.objective.train()
                sums[s.run.name] = {"loss": torch.zeros((), device=dev), "terms": {}, "seen": 0, "lr": cfg.lr,
                                    "correct": torch.zeros((), device=dev, dtype=torch.long), "seconds": 0.0}
            for step, x, y, index in source.epoch(g, cfg.batch_size, ddp, views):
                for s in active:
                    t1, acc = time.perf_counter(), sums[s.run.name]
                    phase, e = s.opt_phase, epoch - s.init_epochs if s.opt_phase == "main" else epoch
                    acc["lr"] = lr = learning_rate(cfg, e, step, steps) if phase == "main" else cfg.lr
                    graphs = compiled_graphs() if cfg.runtime.compile else 0
                    with s.own_streams():
                        loss, logits, terms = train_step(s.objective, s.forward_model, s.optimizer, x, y, phase,
                                                         numerics, lr, ddp, index=index, epoch=e)
                    if cfg.runtime.compile:  # the warm-up compiled every graph: a later one is a recompilation, logged
                        s.recompilations += compiled_graphs() - graphs
                    acc["loss"] += loss.detach().float() * len(y)
                    for n, v in terms.items():
                        acc["terms"][n] = acc["terms"].get(n, 0) + v.detach().float() * len(y)
                    acc["correct"] += (logits.detach().argmax(1) == y).sum()
                    acc["seen"] += len(y) * ddp.world
                    acc["seconds"] += time.perf_counter() - t1
                    reporters[s.run.name].step()
            shared = (time.perf_counter() - t0 - sum(a["seconds"] for a in sums.values())) / max(len(active), 1)
            for s in active:
                t1, acc = time.perf_counter(), sums[s.run.name]
                seen, phase = acc["seen"], s.opt_phase
                train_loss = all_sum(acc["loss"], ddp).item() / seen
                if not math.isfinite(train_loss):
                    raise TrainingError(f"{s.run.name}: loss became {train_loss} in epoch {epoch + 1}; "
                                        "lower the learning rate or a loss weight")
                row = {"epoch": epoch + 1, "phase": phase, "lr": acc["lr"], "train_loss": train_loss,
                       "train_top1": 100 * all_sum(acc["correct"], ddp).item() / seen,
                       **{f"loss_{n}": all_sum(v, ddp).item() / seen for n, v in acc["terms"].items()}}
                with s.own_streams():
                    if phase == "main":
                        row.update(evaluate(s.model, source.test()))
                    dt = acc["seconds"] + shared + time.perf_counter() - t1  # its steps, its test, its share of data
                    s.seconds += dt
                    s.history.append(row)
                    if ddp.main:
                        reporters[s.run.name].epoch(row, source.train_size / dt)
                        ckpt_io.atomic_save({"fingerprint": s.fp, "epoch": epoch + 1, "model": s.model.state_dict(),
                                             "objective": s.objective.state_dict(),
                                             "optimizer": s.optimizer.state_dict(), "opt_phase": s.opt_phase,
                                             "generator": g.get_state(), "random": ckpt_io.random_streams(dev),
                                             "history": s.history, "seconds": s.seconds}, s.resume_path)
            barrier(ddp)  # the other ranks wait until the epoch's checkpoints are safely written
            stop_after = runs[0].stop_after or int(os.environ.get("KDPIPE_STOP_AFTER", "0")) or None
            if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < max(s.total for s in students):
                raise KeyboardInterrupt(f"stopped after epoch {epoch + 1} (test hook)")
    finally:
        for r in reporters.values():
            r.close()

    finals = [ckpt_io.final_checkpoint(s.model, cfg, source.num_classes, source.manifest, s.history, s.run.meta)
              for s in students]
    if ddp.main:  # only rank 0 writes checkpoints, metrics and logs
        for s, final in zip(students, finals):
            run = s.run
            ckpt_io.atomic_save(final, run.out)
            log = {"name": run.name, "model": cfg.model, **run.meta, "device": str(dev), "bf16": numerics.bf16,
                   "channels_last": numerics.channels_last, "torch": torch.__version__, "world_size": ddp.world,
                   # what each part of the loss did, epoch by epoch (the report shows the last epoch's)
                   "loss_terms": [{"epoch": r["epoch"], "phase": r["phase"],
                                   **{k.removeprefix("loss_"): v for k, v in r.items() if k.startswith("loss_")}}
                                  for r in s.history]}
            timing = {"seconds": round(s.seconds, 3),
                      "images_per_s": round(source.train_size * s.total / max(s.seconds, 1e-9), 1),
                      "compile_seconds": round(compile_seconds[run.name], 3),
                      **({"recompilations": s.recompilations} if cfg.runtime.compile else {}),
                      **({"runs_eager": s.runs_eager} if s.runs_eager else {}),
                      **({"group": [r.name for r in runs]} if len(runs) > 1 else {})}
            ckpt_io.atomic_write(run.log, json.dumps(log, indent=2) + "\n")
            ckpt_io.atomic_write(ckpt_io.timing_path(run.log), json.dumps(timing, indent=2) + "\n")
        for s in students:  # last: a group killed while writing resumes from every run's last epoch
            s.resume_path.unlink(missing_ok=True)
    barrier(ddp)
    return finals


def _compile_warmup(objective, forward_model, model, source, cfg, init_phase: bool, ddp: Ranks) -> float:
    """Trigger torch.compile's compilation (the model's and, for a distilled student, the teacher's forward) before
    the timed epochs, without changing the run: one forward/backward per phase and per batch size an epoch trains on
    (the full batch and the last, smaller one: each a graph of its own, so no epoch recompiles; two under
    reduce-overhead, which records CUDA graphs at the second) on a batch drawn from a separate generator, then
    weights, BN statistics, gradients and the process's random streams (Dropout's) are put back exactly as they were."""
    t0 = time.perf_counter()
    streams = ckpt_io.random_streams(source.numerics.device)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_obj = {k: v.clone() for k, v in objective.state_dict().items()}
    g = torch.Generator(device=source.numerics.device).manual_seed(0)
    _, x, y, idx = next(iter(source.epoch(g, cfg.batch_size, ddp, views=objective.views)))
    model.train()
    objective.train()
    # CUDA graphs (reduce-overhead) run a graph's first call plainly and record it at its second, in a new step
    calls = 2 if cfg.runtime.compile == "reduce-overhead" else 1
    for phase in (("init", "main") if init_phase else ("main",)):
        for n in shard_sizes(source.train_size, cfg.batch_size, ddp):
            xs = tuple(v[:n] for v in x) if isinstance(x, tuple) else x[:n]
            for _ in range(calls):
                if source.numerics.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                with source.numerics.autocast():
                    loss, _, _ = objective(forward_model, xs, y[:n], phase, index=idx[:n])
                loss.backward()
    model.load_state_dict(saved)
    objective.load_state_dict(saved_obj)
    for p in list(model.parameters()) + list(objective.parameters()):
        p.grad = None
    ckpt_io.restore_random_streams(streams, source.numerics.device)
    if source.numerics.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0
