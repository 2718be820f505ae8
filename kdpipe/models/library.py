"""What the two model libraries' families (tv.py: torchvision, timm_models.py: timm) share: reading a weights file,
fitting its classifier to another class count, the one error for weights that cannot be had, and the class swap that
adds kdpipe's `features=True` to a library's model while the instance stays the library's."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import torch
from torch import nn

from ..config import Error


class WeightsError(Error):
    """Weights that cannot be had: unknown name, missing file, a download that failed, a file that does not fit."""


def check_file(label: str, path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"{label}: weights file not found: {p}")
    return p


def read_state_dict(label: str, path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors (safetensors' loader) or .pth/.pt (torch.load, weights only)."""
    p = check_file(label, path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file  # a dependency of timm, not of kdpipe

            return load_file(str(p), device="cpu")
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except ImportError:
        raise WeightsError(f"{label}: reading {p} needs safetensors: pip install safetensors") from None
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise WeightsError(f"{label}: {p} is not a readable state dict ({type(e).__name__})") from None
    if not (isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise WeightsError(f"{label}: {p} is not a state dict (a flat mapping of names to tensors)")
    return sd


def head_keys(own: dict, loaded: dict, num_classes: int) -> list[str]:
    """The keys whose tensors differ from the model's only in a first dimension of `num_classes` in the
    model: the classifier's, whatever the architecture calls it. Any other shape mismatch is an error."""
    keys = [k for k in loaded if k in own and loaded[k].shape != own[k].shape]
    for k in keys:
        if not (own[k].shape[0] == num_classes and own[k].shape[1:] == loaded[k].shape[1:]):
            raise WeightsError(f"{k} has shape {tuple(loaded[k].shape)} in the weights but "
                               f"{tuple(own[k].shape)} in the model")
    return keys


def note_new_head(label: str, source: str, classes: int, num_classes: int) -> None:
    print(f"{label}: {source} has {classes} classes; classifier replaced by a new one for {num_classes} classes",
          file=sys.stderr)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def add_mixin(model: nn.Module, mixin: type) -> nn.Module:
    """Swap the model's class for a subclass of it with `mixin` first (one per library class): the instance,
    its modules, parameters and state-dict keys stay the library's."""
    cls = type(model)
    if (mixin, cls) not in _SUBCLASSES:
        _SUBCLASSES[mixin, cls] = type(cls.__name__, (mixin, cls), {"__module__": mixin.__module__})
    model.__class__ = _SUBCLASSES[mixin, cls]
    return model
