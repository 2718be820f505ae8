"""Checkpoint files: atomic writes, the final checkpoint's format and checks, the resume state.

A final checkpoint (`models/NAME.pt`) holds weights, config and history and no wall-clock times (those
go to `logs/NAME.timing.json`), so re-running a stage gives byte-identical files. The resume state
(`models/NAME.pt.resume`) is the full training state after the last finished epoch, tagged with a
fingerprint of everything that decides the run, so a changed run never resumes from another's state.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import Error, Manifest

FORMAT = "kdpipe-checkpoint/1"
RESUME_FORMAT = "kdpipe-resume/2"  # part of the fingerprint: a state of an older layout is not resumed from


class CheckpointError(Error):
    pass


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


def check_writable(*folders: Path, error: type[Exception] = Error) -> None:
    """Fail before training, not after the first epoch, when an output folder cannot be written."""
    for d in folders:
        try:
            d.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=d):
                pass
        except OSError as e:
            raise error(f"{d}: cannot write outputs there ({e.strerror or type(e).__name__})") from None


def model_path(name: str) -> Path:
    """The one naming rule of outputs: a run called NAME writes models/NAME.pt (checkpoint) and logs/NAME.json
    (its history), and `kdpipe evaluate NAME` writes metrics/NAME.json and plots/NAME.csv."""
    return Path(f"models/{name}.pt")


def log_path(name: str) -> Path:
    return Path(f"logs/{name}.json")


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


def restore_model(ckpt: dict) -> nn.Module:
    from .models import create

    model = create(ckpt["model"], ckpt["num_classes"])
    model.load_state_dict(ckpt["state_dict"])
    return model


def final_checkpoint(model: nn.Module, cfg, num_classes: int, manifest: Manifest, history: list, meta: dict) -> dict:
    from .models import count_params_m

    # JSON round-trip: equal values pickle to equal bytes whether or not they came from a resume state
    canonical = json.loads(json.dumps({"history": history, "meta": meta}))
    return {
        "format": FORMAT,
        "model": cfg.model,
        "num_classes": num_classes,
        "params_m": count_params_m(model),
        "state_dict": {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()},
        "config": cfg.model_dump(mode="json"),
        "meta": canonical["meta"],
        "dataset": manifest.dataset,
        "data_sha256": manifest.sha256,
        # input normalisation (RGB, images scaled to 0..1): a checkpoint alone is enough to run the model
        "normalization": manifest.normalization,
        "history": canonical["history"],
    }


def random_streams(device: torch.device) -> dict:
    """The process-wide random generators a run draws from besides its own generator: torch's CPU and CUDA
    default generators (Dropout, timm's drop-path, any op without a `generator`), numpy's and Python's. Saved
    in the resume state, so a resumed process continues them where the interrupted one was."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate()}


def restore_random_streams(state: dict, device: torch.device) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def resume_path(out: Path) -> Path:
    return out.with_name(out.name + ".resume")


def read_resume(path: Path, fp: str) -> Optional[dict]:
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
