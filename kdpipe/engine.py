"""The one training loop shared by teachers, student baselines and distilled students.

A run is a pure function of its params: one `torch.Generator`, seeded from the config, drives shuffling
and augmentation (through the data source, kdpipe/sources.py), `torch.manual_seed(seed)` drives
initialisation and the process's default generators (Dropout, drop-path), so on the CPU two runs are
bit-identical. After every epoch the full training state, the default generators' states included, is
written atomically to `<out>.resume`; re-running the same command resumes from it and ends bit-identical
to an uninterrupted run (kdpipe/checkpoint.py). Device, numerics and DDP: the run context (kdpipe/runtime.py).
"""

from __future__ import annotations

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
from .runtime import Context, Ranks, Numerics, TrainingError, all_sum, barrier, context, wrap
from .sources import MemorySource


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


def train(run: Run, source, ctx: Optional[Context] = None) -> dict:
    """Train `run.model` on `source` (a kdpipe/sources.py source opened in `ctx`, or prepared data for a
    MemorySource) in the run context `ctx` (runtime.context of the run's params when not given)."""
    cfg = run.cfg
    ctx = ctx or context(cfg.runtime)
    ddp, numerics = ctx.dist, ctx.numerics
    dev = numerics.device
    if not hasattr(source, "epoch"):
        source = MemorySource(source, numerics)
    objective = run.objective.to(dev)
    init_epochs = objective.init_epochs()
    if ddp.world > 1 and cfg.batch_size % ddp.world:
        raise TrainingError(f"batch_size {cfg.batch_size} is not divisible by the {ddp.world} processes")
    model, forward_model = wrap(run.model, ddp, numerics, cfg.runtime.compile, cfg.runtime.sync_bn, init_epochs > 0)

    def params(phase: str) -> list[nn.Parameter]:  # what the objective says trains in this phase
        return [p for p in objective.trainable(model, phase) if p.requires_grad]

    if ddp.main:
        ckpt_io.check_writable(run.out.parent, run.log.parent, error=TrainingError)
    steps, total = source.steps(cfg.batch_size), init_epochs + cfg.epochs
    resume_path = ckpt_io.resume_path(run.out)
    fp = ckpt_io.fingerprint(ckpt_io.RESUME_FORMAT, cfg.model_dump(), run.meta, source.manifest.sha256, dev.type,
                             numerics.bf16, numerics.channels_last, ddp.world)
    g = torch.Generator(device=dev).manual_seed(cfg.seed)
    history, start, seconds, opt_phase, optimizer = [], 0, 0.0, None, None
    state = ckpt_io.read_resume(resume_path, fp)
    if state is not None:
        model.load_state_dict(state["model"])
        objective.load_state_dict(state["objective"])
        g.set_state(state["generator"])
        ckpt_io.restore_random_streams(state["random"], dev)
        history, start, seconds, opt_phase = state["history"], state["epoch"], state["seconds"], state["opt_phase"]
        optimizer = make_optimizer(params(opt_phase), cfg, dev, objective.optimizer(opt_phase))
        optimizer.load_state_dict(state["optimizer"])
        if ddp.main:
            print(f"{run.name}: resuming after epoch {start}/{total} from {resume_path}", file=sys.stderr)
    compile_seconds = 0.0
    if cfg.runtime.compile and start < total:
        compile_seconds = _compile_warmup(objective, forward_model, model, source, cfg, init_epochs > start)

    reporter = Reporter(run.name, total, steps, run.progress and ddp.main)
    try:
        for epoch in range(start, total):
            phase = "init" if epoch < init_epochs else "main"
            if opt_phase != phase:  # each phase starts with a fresh optimizer (init stage -> main)
                optimizer, opt_phase = make_optimizer(params(phase), cfg, dev, objective.optimizer(phase)), phase
            e = epoch - init_epochs if phase == "main" else epoch
            t0 = time.perf_counter()
            model.train()
            objective.train()
            loss_sum = torch.zeros((), device=dev)
            term_sums: dict[str, torch.Tensor] = {}
            correct = torch.zeros((), device=dev, dtype=torch.long)
            lr, seen = cfg.lr, 0
            for step, x, y, index in source.epoch(g, cfg.batch_size, ddp, objective.views):
                lr = learning_rate(cfg, e, step, steps) if phase == "main" else cfg.lr
                loss, logits, terms = train_step(objective, forward_model, optimizer, x, y, phase, numerics, lr, ddp,
                                                 index=index, epoch=e)
                loss_sum += loss.detach().float() * len(y)
                for n, v in terms.items():
                    term_sums[n] = term_sums.get(n, 0) + v.detach().float() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y) * ddp.world
                reporter.step()
            train_loss = all_sum(loss_sum, ddp).item() / seen
            if not math.isfinite(train_loss):
                raise TrainingError(f"{run.name}: loss became {train_loss} in epoch {epoch + 1}; "
                                    "lower the learning rate or a loss weight")
            row = {"epoch": epoch + 1, "phase": phase, "lr": lr, "train_loss": train_loss,
                   "train_top1": 100 * all_sum(correct, ddp).item() / seen,
                   **{f"loss_{n}": all_sum(v, ddp).item() / seen for n, v in term_sums.items()}}
            if phase == "main":
                row.update(evaluate(model, source.test()))
            dt = time.perf_counter() - t0
            seconds += dt
            history.append(row)
            if ddp.main:
                reporter.epoch(row, source.train_size / dt)
                ckpt_io.atomic_save({"fingerprint": fp, "epoch": epoch + 1, "model": model.state_dict(),
                                     "objective": objective.state_dict(), "optimizer": optimizer.state_dict(),
                                     "opt_phase": opt_phase, "generator": g.get_state(),
                                     "random": ckpt_io.random_streams(dev), "history": history,
                                     "seconds": seconds}, resume_path)
            barrier(ddp)  # the other ranks wait until the epoch's checkpoint is safely written
            stop_after = run.stop_after or int(os.environ.get("KDPIPE_STOP_AFTER", "0")) or None
            if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < total:
                raise KeyboardInterrupt(f"stopped after epoch {epoch + 1} (test hook)")
    finally:
        reporter.close()

    final = ckpt_io.final_checkpoint(model, cfg, source.num_classes, source.manifest, history, run.meta)
    if ddp.main:  # only rank 0 writes checkpoints, metrics and logs
        ckpt_io.atomic_save(final, run.out)
        log = {"name": run.name, "model": cfg.model, **run.meta, "device": str(dev), "bf16": numerics.bf16,
               "channels_last": numerics.channels_last, "torch": torch.__version__, "world_size": ddp.world,
               # what each part of the loss did, epoch by epoch (the report shows the last epoch's)
               "loss_terms": [{"epoch": r["epoch"], "phase": r["phase"],
                               **{k.removeprefix("loss_"): v for k, v in r.items() if k.startswith("loss_")}}
                              for r in history]}
        timing = {"seconds": round(seconds, 3), "images_per_s": round(source.train_size * total / max(seconds, 1e-9), 1),
                  "compile_seconds": round(compile_seconds, 3)}
        ckpt_io.atomic_write(run.log, json.dumps(log, indent=2) + "\n")
        ckpt_io.atomic_write(ckpt_io.timing_path(run.log), json.dumps(timing, indent=2) + "\n")
        resume_path.unlink(missing_ok=True)
    barrier(ddp)
    return final


def _compile_warmup(objective, forward_model, model, source, cfg, init_phase: bool) -> float:
    """Trigger torch.compile's compilation before the timed epochs, without changing the run: one
    forward/backward on a batch drawn from a separate generator, then weights, BN statistics, gradients and
    the process's random streams (Dropout's) are put back exactly as they were."""
    t0 = time.perf_counter()
    streams = ckpt_io.random_streams(source.numerics.device)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_obj = {k: v.clone() for k, v in objective.state_dict().items()}
    g = torch.Generator(device=source.numerics.device).manual_seed(0)
    _, x, y, idx = next(iter(source.epoch(g, cfg.batch_size, views=objective.views)))
    model.train()
    objective.train()
    for phase in (("init", "main") if init_phase else ("main",)):
        with source.numerics.autocast():
            loss, _, _ = objective(forward_model, x, y, phase, index=idx)
        loss.backward()
    model.load_state_dict(saved)
    objective.load_state_dict(saved_obj)
    for p in list(model.parameters()) + list(objective.parameters()):
        p.grad = None
    ckpt_io.restore_random_streams(streams, source.numerics.device)
    if source.numerics.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0
