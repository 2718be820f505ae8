"""Building a run from params: what `kdpipe teacher`, `student` and `distill` train, seeded and wired.

Everything here decides results (seeds, the teacher's checks and input normalisation, the objective), so
every training stage of the pipelines depends on this file; `cli.py` only parses arguments and prints.
A run called NAME writes checkpoint.model_path(NAME) and checkpoint.log_path(NAME).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint as ckpt_io
from . import config, engine, models, runtime, sources
from .config import ParamsError
from .data import file_sha256


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


@dataclass
class Student:
    """One student of `kdpipe distill`: its methods (kd+at: one combination), variant tag, run name and recipe."""

    methods: list[str]
    variant: Optional[str]
    name: str
    cfg: config.Train


def groups(students: list[Student]) -> list[list[Student]]:
    """Students that can share batches and teacher forwards: the same recipe and the same views of each batch
    (MLKD's strong view draws from the data generator), in their order of first appearance."""
    from . import distill as distill_mod

    out: dict = {}
    for st in students:
        views = tuple(sorted({v for m in st.methods for v in distill_mod.get(m).views}))
        out.setdefault((st.cfg.model_dump_json(), views), []).append(st)
    return list(out.values())


def distill(students: list[Student], params: config.Params, teacher: Path, data_dir: Path,
            na_ok: bool = False) -> dict[str, str]:
    """Distil the teacher checkpoint into each student (params `distill.<method>`, with the keys of its variant
    set, when it has one); students of one group (`groups`) train together, on one data pass and one teacher
    forward per batch, each ending as it would alone. Returns {name: reason} of the students that cannot run on
    this pair and that `na_ok` recorded as not applicable."""
    if runtime.processes().world > 1:  # before the process group starts
        single = sorted({m for st in students for m in st.methods if not _method(m).supports_ddp})
        if single:
            raise ParamsError([f"{', '.join(single)} under torchrun is not supported (e.g. CRD's memory bank is "
                               "not shared across processes); run it in one process"])
        if len(students) > 1:
            raise ParamsError(["--method given more than once: a group of students trains in one process"])
    skipped: dict[str, str] = {}
    for group in groups(students):
        skipped.update(_distill_group(group, params, teacher, data_dir, na_ok))
    return skipped


def _method(name: str):
    from . import distill as distill_mod

    return distill_mod.get(name)


def load_teacher(teacher: Path, source, data_dir: Path, numerics: runtime.Numerics):
    """The teacher checkpoint for the data of `source`: (checkpoint, model on the device, the re-normalisation of
    its input (None: the data's own), the file's sha256). It must have been trained on the data in `data_dir`, or be an
    imported published teacher of the same dataset (checked by name and class count)."""
    manifest = source.manifest
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
    model = numerics.prepare_model(ckpt_io.restore_model(ckpt))
    teacher_input = sources.renormalisation(manifest.normalization, ckpt.get("normalization"), numerics.device)
    teacher_sha256 = file_sha256(teacher)
    return ckpt, model, teacher_input, teacher_sha256


def _distill_group(group: list[Student], params: config.Params, teacher: Path, data_dir: Path,
                   na_ok: bool) -> dict[str, str]:
    from .distill import Distiller, TeacherPass, TrainData, feature_shapes

    cfg = group[0].cfg
    ctx = runtime.context(cfg.runtime)
    numerics = ctx.numerics
    source = sources.open_source(data_dir, numerics, cfg.runtime.workers)
    manifest, size = source.manifest, source.manifest.image_size
    ckpt, teacher_model, teacher_input, teacher_sha256 = load_teacher(teacher, source, data_dir, numerics)
    teacher_pass = TeacherPass()
    # the teacher's forward compiled once for the group where runtime.compile asks (its graphs: the warm-up's); as CUDA
    # graphs (reduce-overhead) for a student alone only: in a group, the outputs the others read would be reclaimed
    # at the next student's step, and a student's calls would not follow its warm-up's (the teacher's, then its own)
    mode = cfg.runtime.compile if len(group) == 1 else bool(cfg.runtime.compile)
    teacher_forward = runtime.compiled(teacher_model, mode) if mode else None
    built, skipped = [], {}
    for st in group:  # each built right after seeding, as alone; the streams it leaves are its own
        torch.manual_seed(cfg.seed)
        student_model = models.create(cfg.model, source.num_classes, cfg.weights)
        pair = (ckpt["model"], cfg.model)
        distill_params = params.varied(st.variant, st.methods).distill.for_pair(*pair)
        meta = {"role": "distill", "method": "+".join(st.methods), **({"variant": st.variant} if st.variant else {}),
                "teacher": ckpt["model"], "teacher_sha256": teacher_sha256,
                "distill": {m: getattr(distill_params, m).model_dump() for m in st.methods}}
        try:
            objective = Distiller(teacher_model, st.methods, distill_params,
                                  feature_shapes(student_model, image_size=size),
                                  feature_shapes(teacher_model, numerics.device, size), TrainData(source.train_labels),
                                  teacher_input, teacher_pass, teacher, teacher_forward)
        except ValueError as e:  # an impossible teacher/student combination for this method
            if not na_ok:
                raise ParamsError([f"{st.name}: {e}" if len(group) > 1 else str(e)]) from None
            ckpt_io.write_not_applicable(ckpt_io.model_path(st.name), ckpt_io.log_path(st.name), cfg.model,
                                         source.num_classes, str(e), meta)
            skipped[st.name] = str(e)
            continue
        built.append(engine.Run(name=st.name, model=student_model, cfg=cfg, out=ckpt_io.model_path(st.name),
                                log=ckpt_io.log_path(st.name), objective=objective, meta=meta,
                                streams=ckpt_io.random_streams(numerics.device)))
    if built:
        built[-1].streams = None  # the last one built: the process's streams are its own
        engine.train_group(built, source, ctx)
    return skipped
