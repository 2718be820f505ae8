"""`kdpipe export`: a trained student as a portable model (ONNX by default, or TorchScript).

What is exported: the model alone (no regressors, embeddings or other method parts), eval mode, fp32,
a dynamic batch dimension, and the input normalisation **folded into the graph**: the input is
`image`, float32 RGB in [0, 1] (uint8 pixels / 255), shape (N, 3, S, S) with S the data's `image_size`; the output is `logits`
(N, classes). The mean/std, class names and the source checkpoint are also written to the ONNX
metadata, with `kdpipe.epoch` (the epoch of the exported weights: the checkpoint's last, its number of
training epochs; an imported checkpoint's source epoch, else 0) and `kdpipe.top1` (their test Top-1,
metrics' `top1_last`, where `kdpipe evaluate` has run). After exporting, the file is run (onnxruntime / torch.jit.load) on a batch of the prepared
test set and compared with PyTorch; a max |logit difference| above `tolerance` is an error and removes
the file.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .runtime import Numerics
from .sources import open_source
from .config import Error
from .checkpoint import CheckpointError, load_checkpoint, restore_model

TOLERANCE = 1e-4


class ExportError(Error):
    pass


class Normalized(nn.Module):
    """model((x - mean) / std) for x in [0, 1]: the exported graph takes plain RGB floats."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image):
        return self.model((image - self.mean) / self.std)


def _onnx(module: nn.Module, path: Path, opset: int | None, metadata: dict, size: int) -> None:
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the export extra: pip install -e '.[export]'") from None
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(module, (torch.rand(2, 3, size, size),), input_names=["image"], output_names=["logits"],
                                dynamic_shapes={"image": {0: batch}}, opset_version=opset, dynamo=True,
                                verbose=False)
    program.save(str(path))
    proto = onnx.load(str(path))
    for node in proto.graph.node:  # the exporter's stack traces hold absolute source paths: bytes would
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]  # depend on the folder
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    for k, v in metadata.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0])


def weights_epoch(ckpt: dict) -> int:
    """The epoch of a checkpoint's weights: its last training epoch (init-stage epochs not counted, as in the
    metrics' `epochs`), or an imported checkpoint's source epoch (0 where unknown)."""
    main = sum(row["phase"] == "main" for row in ckpt["history"])
    return main or int((ckpt["meta"].get("imported") or {}).get("epoch", 0))


def last_top1(names: list[str], metrics_dir: Path) -> dict[str, float]:
    """Each run's `top1_last` from metrics/NAME.json, where `kdpipe evaluate` recorded one: the accuracy of the
    weights a checkpoint holds (the last epoch's). Runs are compared, and an exported file described, by it, not
    by the best epoch's Top-1, whose weights are not kept."""
    found = {}
    for n in names:
        f = metrics_dir / f"{n}.json"
        m = json.loads(f.read_text()) if f.is_file() else {}
        if "top1_last" in m:  # none for a run recorded as not applicable
            found[n] = m["top1_last"]
    return found


def export_metadata(ckpt: dict, ckpt_path: Path, classes: list[str], norm: dict, size: int) -> dict:
    """The ONNX file's description of what it holds and takes (its `metadata_props`)."""
    return {"kdpipe.model": ckpt["model"], "kdpipe.input": "float32 RGB in [0, 1] (uint8 / 255), NCHW, "
            f"{size}x{size}; normalisation is folded into the graph", "kdpipe.mean": json.dumps(norm["mean"]),
            "kdpipe.std": json.dumps(norm["std"]), "kdpipe.classes": json.dumps(classes),
            "kdpipe.checkpoint": str(ckpt_path), "kdpipe.epoch": str(weights_epoch(ckpt))}


def export(ckpt_path: Path, out: Path, data_dir: Path, fmt: str = "onnx", opset: int | None = None,
           tolerance: float | None = None, n_check: int = 256, top1: float | None = None) -> dict:
    tolerance = TOLERANCE if tolerance is None else tolerance
    ckpt = load_checkpoint(ckpt_path)
    source = open_source(data_dir, Numerics(torch.device("cpu"), bf16=False, channels_last=False), workers=0)
    manifest, size = source.manifest, source.manifest.image_size
    if ckpt["num_classes"] != source.num_classes:
        raise CheckpointError(f"{ckpt_path}: {ckpt['num_classes']} classes, but {data_dir} has {source.num_classes}")
    norm = ckpt.get("normalization") or manifest.normalization
    module = Normalized(restore_model(ckpt), norm["mean"], norm["std"]).eval()
    x = next(iter(source.test_pixels(n_check)))[0].float() / 255
    metadata = export_metadata(ckpt, ckpt_path, manifest.classes, norm, size)
    if top1 is not None:
        metadata["kdpipe.top1"] = f"{top1:.2f}"
    return {**save_checked(module, out, x, fmt, opset, metadata, size, tolerance), "images": len(x)}


def save_checked(module: nn.Module, out: Path, x: torch.Tensor, fmt: str, opset: int | None, metadata: dict,
                 size: int, tolerance: float = TOLERANCE) -> dict:
    """Write `module` (eval mode, taking [0, 1] images) to `out`, run the file on `x` and compare it with PyTorch:
    beyond `tolerance` (max |logit difference|) an error, and no file."""
    with torch.inference_mode():
        expected = module(x)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        if fmt == "onnx":
            _onnx(module, tmp, opset, metadata, size)
            got = _run_onnx(tmp, x)
        else:
            with warnings.catch_warnings():  # torch deprecates TorchScript; asked for by name, it is still served
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
                traced = torch.jit.trace(module, (x[:2],))
                torch.jit.save(traced, str(tmp), _extra_files={k: v.encode() for k, v in metadata.items()})
                with torch.inference_mode():
                    got = torch.jit.load(str(tmp))(x)
        diff = (got - expected).abs().max().item()
        agree = (got.argmax(1) == expected.argmax(1)).float().mean().item() * 100
        if not diff <= tolerance:
            raise ExportError(f"{out}: exported model differs from PyTorch by {diff:.2e} > {tolerance:g} (max |logit|)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "format": fmt, "max_abs_diff": diff, "top1_agreement": agree}
