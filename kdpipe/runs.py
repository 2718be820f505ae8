"""Building a run from params: what `kdpipe teacher`, `student` and `distill` train, seeded and wired.

Everything here decides results (seeds, the teacher's checks and input normalisation, the objective), so
every training stage of the pipelines depends on this file; `cli.py` only parses arguments and prints.
A run called NAME writes checkpoint.model_path(NAME) and checkpoint.log_path(NAME).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint as ckpt_io
from . import config, engine, models, runtime, sources
from .config import ParamsError


def with_overrides(cfg: config.Train, model: Optional[str], seed: Optional[int]) -> config.Train:
    """The section `cfg` with the command line's --model/--seed (the pipelines' matrix values) applied."""
    updates = {k: v for k, v in (("model", model), ("seed", seed)) if v is not None}
    if not updates:
        return cfg
    try:
        return config.validate({**cfg.model_dump(), **updates}, config.Train)
    except ParamsError as e:
        raise ParamsError([f"--{line}" for line in e.lines]) from None


def train(section: str, cfg: config.Train, name: str, data_dir: Path) -> None:
    """Train `cfg.model` from scratch with cross-entropy (a teacher, a baseline, a table's model)."""
    ctx = runtime.context(cfg.runtime)
    source = sources.open_source(data_dir, ctx.numerics, cfg.runtime.workers)
    torch.manual_seed(cfg.seed)
    model = models.create(cfg.model, source.num_classes, cfg.weights)
    run = engine.Run(name=name, model=model, cfg=cfg, out=ckpt_io.model_path(name), log=ckpt_io.log_path(name),
                     meta={"role": "student" if section == "student" else "teacher"})
    engine.train(run, source, ctx)


def distill(methods: list[str], params: config.Params, cfg: config.Train, teacher: Path, name: str,
            data_dir: Path, na_ok: bool = False, variant: Optional[str] = None) -> Optional[str]:
    """Distil the teacher checkpoint into a new `cfg.model` (with the methods' keys of `variant` set, when given).
    Returns the reason where the method cannot run on this pair and `na_ok` recorded it as not applicable, else None."""
    from . import distill as distill_mod
    from .distill import Distiller, TrainData, feature_shapes

    if runtime.processes().world > 1:  # before the process group starts
        single = [m for m in methods if not distill_mod.get(m).supports_ddp]
        if single:
            raise ParamsError([f"{', '.join(single)} under torchrun is not supported (e.g. CRD's memory bank is "
                               "not shared across processes); run it in one process"])
    ctx = runtime.context(cfg.runtime)
    numerics = ctx.numerics
    source = sources.open_source(data_dir, numerics, cfg.runtime.workers)
    manifest, size = source.manifest, source.manifest.image_size
    ckpt = ckpt_io.load_checkpoint(teacher, num_classes=source.num_classes)
    imported = ckpt["meta"].get("imported")
    if imported:  # a published teacher: kdpipe never saw its training arrays
        if ckpt["dataset"] != manifest.dataset:
            raise ckpt_io.CheckpointError(f"{teacher}: an imported {ckpt['dataset']} teacher, but {data_dir} holds "
                                          f"{manifest.dataset}")
        print(f"{teacher}: imported teacher {ckpt['model']} ({imported['file']}, sha256 {imported['sha256'][:12]}); "
              f"checked the dataset name ({ckpt['dataset']}) and class count ({ckpt['num_classes']}), "
              "not the prepared arrays; it sees its own input normalisation", file=sys.stderr)
    elif ckpt["data_sha256"] != manifest.sha256:
        raise ckpt_io.CheckpointError(f"{teacher}: the teacher was trained on other data than {data_dir}")
    teacher_model = numerics.prepare_model(ckpt_io.restore_model(ckpt))
    teacher_input = sources.renormalisation(manifest.normalization, ckpt.get("normalization"), numerics.device)
    torch.manual_seed(cfg.seed)
    student_model = models.create(cfg.model, source.num_classes, cfg.weights)
    pair = (ckpt["model"], cfg.model)
    distill_params = params.varied(variant, methods, pair).distill.for_pair(*pair)
    meta = {"role": "distill", "method": "+".join(methods), **({"variant": variant} if variant else {}),
            "teacher": ckpt["model"], "teacher_sha256": hashlib.sha256(teacher.read_bytes()).hexdigest(),
            "distill": {m: getattr(distill_params, m).model_dump() for m in methods}}
    try:
        objective = Distiller(teacher_model, methods, distill_params, feature_shapes(student_model, image_size=size),
                              feature_shapes(teacher_model, numerics.device, size), TrainData(source.train_labels),
                              teacher_input)
    except ValueError as e:  # an impossible teacher/student combination for this method
        if not na_ok:
            raise ParamsError([str(e)]) from None
        ckpt_io.write_not_applicable(ckpt_io.model_path(name), ckpt_io.log_path(name), cfg.model, source.num_classes, str(e), meta)
        return str(e)
    run = engine.Run(name=name, model=student_model, cfg=cfg, out=ckpt_io.model_path(name), log=ckpt_io.log_path(name),
                     objective=objective, meta=meta)
    engine.train(run, source, ctx)
    return None
