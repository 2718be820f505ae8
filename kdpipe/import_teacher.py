"""`kdpipe import-teacher`: a published teacher (RepDistiller's or mdistiller's checkpoint) as a kdpipe checkpoint.

Training the teachers is half the GPU cost of the CRD table; RepDistiller and mdistiller publish theirs as
`ckpt_epoch_240.pth`: a dict with `model` (the state dict), `epoch`, `accuracy` and `optimizer`. A bare state
dict (or one saved from `nn.DataParallel`, keys prefixed `module.`) is read too. The file is read with
`torch.load(weights_only=True)`: a checkpoint cannot run code. Keys are renamed onto kdpipe's model
(`kdpipe.models.from_reference_key`), every tensor's shape is checked, and the result is a normal kdpipe
checkpoint marked `imported` with the source file's sha256, so `kdpipe distill --teacher`, `kdpipe evaluate`
and `kdpipe.load_model` take it like a trained one.

Input normalisation: RepDistiller and mdistiller normalise CIFAR-100 with fixed constants (below), which
differ slightly from the statistics `kdpipe data` computes; the imported checkpoint records the constants
and `kdpipe distill` feeds the teacher exactly that normalisation.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from . import models
from .checkpoint import FORMAT, CheckpointError, atomic_save, read_weights
from .config import UsageError
from .data import file_sha256, read_manifest

# RepDistiller's dataset/cifar100.py and mdistiller's: transforms.Normalize(mean, std)
REFERENCE_NORMALIZATION = {"cifar100": {"mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]}}
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100}


class TeacherImportError(CheckpointError):  # a checkpoint that cannot be imported
    pass


def target(data_dir: Path | None, dataset: str | None, num_classes: int | None,
           norm: dict | None) -> tuple[str, int, dict | None]:
    """What the teacher is for: (dataset, classes, input normalisation or None for the reference's), from the
    prepared data in `data_dir` (`--data`) or the options, checked against each other; never guessed: the dataset
    decides the input normalisation the teacher gets."""
    if data_dir is not None:
        manifest = read_manifest(data_dir)
        for option, given, found in (("--num-classes", num_classes, manifest.num_classes),
                                     ("--dataset", dataset, manifest.dataset)):
            if given is not None and given != found:
                raise UsageError(f"{option} {given} but {data_dir} holds {found}")
        dataset, num_classes = manifest.dataset, manifest.num_classes
        if norm is None and dataset not in REFERENCE_NORMALIZATION:
            norm = manifest.normalization
    if dataset is None:
        raise UsageError("give --dataset (what the teacher was trained on, e.g. cifar100) or --data (the prepared data)")
    num_classes = num_classes or DATASET_CLASSES.get(dataset)
    if num_classes is None:
        raise UsageError(f"give --num-classes (the classes of this {dataset} teacher)")
    if dataset in DATASET_CLASSES and num_classes != DATASET_CLASSES[dataset]:
        raise UsageError(f"--num-classes {num_classes} but {dataset} has {DATASET_CLASSES[dataset]} classes")
    if norm is None and dataset not in REFERENCE_NORMALIZATION:
        raise UsageError(f"--dataset {dataset}: no reference normalisation known for it: give --mean and --std")
    return dataset, num_classes, norm


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict of a reference checkpoint, and what else it says (epoch, accuracy)."""
    obj = read_weights(path, TeacherImportError)
    info = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        # RepDistiller saves its accuracy as a 0-dim tensor (an AverageMeter of tensors)
        numbers = {k: obj[k].item() if isinstance(obj.get(k), torch.Tensor) and obj[k].numel() == 1 else obj.get(k)
                   for k in ("epoch", "accuracy", "best_acc")}
        info = {k: v for k, v in numbers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeacherImportError(f"{path}: holds no state dict (expected a dict with 'model', or a bare state dict)")
    if all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj, info


def to_reference(name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kdpipe state dict with the reference's key names (the inverse of the import's renames): to evaluate a
    kdpipe model in RepDistiller or mdistiller, and to build reference-layout checkpoints in tests."""
    back = {v: k for k, v in models.reference_keys(name).items()}
    return {".".join(back.get(part, part) for part in k.split(".")): v for k, v in state_dict.items()}


def map_state_dict(source: dict[str, torch.Tensor], name: str, num_classes: int, path: Path) -> dict[str, torch.Tensor]:
    """`source` renamed onto kdpipe's `name` model, every key present and every shape equal."""
    target = models.create(name, num_classes).state_dict()
    mapped = {models.from_reference_key(name, k): v for k, v in source.items()}
    unexpected = sorted(set(mapped) - set(target))
    # older checkpoints (torch < 0.4.1) have no BN batch counters; they only matter for momentum=None
    missing = sorted(k for k in set(target) - set(mapped) if not k.endswith("num_batches_tracked"))
    if unexpected or missing:
        what = "; ".join(filter(None, [f"unexpected keys {', '.join(unexpected[:3])}" if unexpected else "",
                                       f"missing keys {', '.join(missing[:3])}" if missing else ""]))
        raise TeacherImportError(f"{path}: not a {name} checkpoint ({what})")
    for k, v in target.items():
        got = mapped.get(k, v)
        if got.shape != v.shape:
            hint = f" (a model for {got.shape[0]} classes?)" if got.dim() >= 1 and got.shape[1:] == v.shape[1:] \
                and v.shape[0] == num_classes and k.endswith(("weight", "bias")) else ""
            raise TeacherImportError(f"{path}: {k} has shape {tuple(got.shape)}, {name} with {num_classes} classes "
                               f"needs {tuple(v.shape)}{hint}")
        mapped[k] = got.to(v.dtype)
    return {k: mapped[k].contiguous() for k in target}


def import_teacher(path: Path, name: str, num_classes: int, out: Path, dataset: str,
                   normalization: dict | None = None) -> dict:
    """Write `out` as a kdpipe checkpoint of the reference checkpoint `path` (nothing written on error)."""
    normalization = normalization or REFERENCE_NORMALIZATION.get(dataset)
    if normalization is None:
        raise TeacherImportError(f"no reference normalisation known for {dataset!r}: pass --mean and --std")
    if name in models.REGISTRY:  # a RepDistiller/mdistiller checkpoint of kdpipe's own model
        source, info = read_state_dict(path)
        state = map_state_dict(source, name, num_classes, path)
        model = models.create(name, num_classes)
        model.load_state_dict(state)
        imported = {"file": path.name, "sha256": file_sha256(path), **info}
    elif path.is_file() or models.is_weights_file(str(path)):  # a tv/ or timm/ state dict in the library's layout
        from .models.library import read_state_dict as read_library_state_dict

        source = read_library_state_dict(name, str(path))
        model = models.create(name, num_classes, weights=str(path))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        wrong = next((k for k, v in source.items() if k in state and v.shape != state[k].shape), None)
        if wrong:  # a teacher is used as it is: never with a new, untrained classifier
            raise TeacherImportError(f"{path}: {wrong} has shape {tuple(source[wrong].shape)}, but {name} for "
                               f"{num_classes} classes has {tuple(state[wrong].shape)}")
        imported = {"file": path.name, "sha256": file_sha256(path)}
    else:  # a library's weights name (IMAGENET1K_V1, pretrained, ...): the published teachers of ImageNet tables
        classes = models.weights_classes(name, str(path))
        if classes != num_classes:
            raise TeacherImportError(f"{name} {path}: weights for {classes} classes, but the data has {num_classes}")
        model = models.create(name, num_classes, weights=str(path))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        digest = hashlib.sha256()  # the weights' identity: their tensors, in key order
        for k, v in state.items():
            digest.update(k.encode() + v.numpy().tobytes())
        imported = {"file": str(path), "sha256": digest.hexdigest()}
    ckpt = {
        "format": FORMAT,
        "model": name,
        "num_classes": num_classes,
        "params_m": models.count_params_m(model),
        "state_dict": state,
        "config": None,
        "meta": {"role": "teacher", "imported": imported},
        "dataset": dataset,
        "data_sha256": None,  # not trained by kdpipe: distill checks the dataset name and class count instead
        "normalization": normalization,
        "history": [],
    }
    atomic_save(ckpt, out)
    return ckpt
