"""`timm/<name>`: any timm model (`timm.list_models()`, a `.tag` allowed), built by `timm.create_model`, with
kdpipe's `features=True` added. timm is optional (`pip install 'kdpipe[timm]'`) and imported only here, on use.

As for `tv/`, the model IS timm's, its class swapped for a subclass that adds the `features` argument
(`library.add_mixin`): state-dict keys, parameter counts and timm's attributes (`pretrained_cfg`, ...) stay timm's.
`features=True` uses timm's own API:
- `stages`: `forward_intermediates` (NCHW maps, the tokens of transformers reshaped by timm) at the last
  `feature_info` entry of each reduction: resnet: `act1` (the stem after its ReLU, stride 2),
  `layer1`..`layer4`; mobilenetv3/efficientnet: the last block at each stride (efficientnet's 320-d
  last block, before `conv_head`); convnext: its 4 stages. Models whose entries all share one reduction
  (ViT, DeiT) give the last block of each quarter of their depth (e.g. blocks 3, 6, 9, 12 of 12).
  A model without `forward_intermediates` gives no stages (logit methods only).
- `embedding`: `forward_head(final, pre_logits=True)`, the vector timm's classifier reads (mobilenetv3: the
  1024-d output of `conv_head`, after the global pool).
- `logits`: `forward_head(final)`, so they equal `forward(x)`. `preact`: the stages (timm has no such taps).

`weights`: None (the architecture's own init), `pretrained` (timm's default tag of that architecture) or a
tag (`a1_in1k`, ...), through timm's Hugging Face / torch.hub caches, or a state-dict file (.pth/.pt/
.safetensors) in timm's key layout, loaded by timm (`pretrained_cfg_overlay=dict(file=...)`). timm drops the
classifier of weights for another class count (`pretrained=True, num_classes=...`); one line on stderr says so.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .base import Features, is_weights_file
from .library import WeightsError, add_mixin, check_file, note_new_head

PREFIX = "timm/"


def _timm(label: str):
    try:
        import timm
    except ImportError:
        raise ValueError(f"{label} needs timm: pip install 'kdpipe[timm]'") from None
    return timm


def check_name(name: str) -> None:
    label = PREFIX + name
    timm = _timm(label)
    arch, _ = timm.models.split_model_name_tag(name)
    if not timm.is_model(arch):
        close = ", ".join(PREFIX + n for n in timm.list_models(f"*{arch}*")[:5]) or "timm/resnet18"
        raise ValueError(f"unknown model {label!r}; e.g. {close} (see timm.list_models())")
    try:
        timm.models.get_pretrained_cfg(name)  # an unknown .tag in the name
    except RuntimeError as e:
        raise ValueError(f"{label}: {e} (see timm.list_pretrained('{arch}.*'))") from None


def create(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """timm's `name` for `num_classes` classes, with `weights` (see the module docstring)."""
    label = PREFIX + name
    check_name(name)
    timm = _timm(label)
    arch, _ = timm.models.split_model_name_tag(name)
    if weights is None:
        model = timm.create_model(name, num_classes=num_classes)
    elif is_weights_file(weights):
        model = _from_file(timm, label, name, num_classes, weights)
    else:
        model = _from_named(timm, label, name, arch, num_classes, weights)
    return _with_features(model)


def weights_classes(name: str, weights: str) -> int:
    """The class count of the named weights' classifier (without loading them)."""
    timm = _timm(PREFIX + name)
    arch, _ = timm.models.split_model_name_tag(name)
    return _resolve(timm, PREFIX + name, name, arch, weights)[1].num_classes


def _resolve(timm, label: str, name: str, arch: str, weights: str):
    """(the full `arch.tag` name, timm's pretrained config) a weights name means."""
    full = name if weights == "pretrained" else f"{arch}.{weights}"
    try:
        cfg = timm.models.get_pretrained_cfg(full, allow_unregistered=False)
    except RuntimeError:  # an unknown tag, or an architecture without pretrained weights
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise WeightsError(f"{label}: unknown weights {weights!r}; valid: pretrained, {', '.join(tags)} or a "
                           ".pth/.safetensors file" if tags else f"{label}: timm has no pretrained weights for "
                           f"{arch}; pass weights: /path/to/file.safetensors")
    return full, cfg


def _from_named(timm, label: str, name: str, arch: str, num_classes: int, weights: str) -> nn.Module:
    full, cfg = _resolve(timm, label, name, arch, weights)
    source = f"{arch}.{cfg.tag}"
    try:
        model = timm.create_model(full, pretrained=True, num_classes=num_classes)
    except OSError as e:  # huggingface_hub's errors (offline, not cached, HTTP) and urllib's are OSErrors
        raise WeightsError(f"{label}: cannot download {source} weights ({type(e).__name__}); "
                           f"offline, {_where(cfg)}, or pass weights: /path/to/file.safetensors") from None
    if cfg.num_classes != num_classes:
        note_new_head(label, source, cfg.num_classes, num_classes)
    return model


def _where(cfg) -> str:
    """Where timm looks for the weights: the Hugging Face cache (if huggingface_hub is installed) or torch.hub's."""
    try:
        from huggingface_hub import constants
    except ImportError:
        constants = None
    if cfg.hf_hub_id and constants is not None:
        return (f"put Hugging Face repo {cfg.hf_hub_id} in the cache {constants.HF_HUB_CACHE} "
                f"(hf download {cfg.hf_hub_id}; HF_HUB_OFFLINE=1 skips the retries)")
    file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
    return f"put {cfg.url} at {file}"


def _from_file(timm, label: str, name: str, num_classes: int, path: str) -> nn.Module:
    p = check_file(label, path)
    cfg = timm.models.get_pretrained_cfg(name)  # None for an architecture without pretrained weights
    classifier = cfg and cfg.classifier
    classes = _classes_in(p, classifier if isinstance(classifier, str) else (classifier or [None])[0])
    # timm loads the file and drops its classifier when its class count (the cfg's, here the file's) differs
    overlay = dict(file=str(p), **({"num_classes": classes} if classes else {}))
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay)
    except (RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise WeightsError(f"{label}: {p} does not load ({type(e).__name__}: {first}); a state dict in timm's "
                           "key layout is expected") from None
    if classes and classes != num_classes:
        note_new_head(label, str(p), classes, num_classes)
    return model


def _classes_in(path: Path, classifier: str | None) -> int | None:
    """The class count of the file's classifier (`<classifier>.weight`'s rows), read without loading the file."""
    if not classifier:
        return None
    key = classifier + ".weight"
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return f.get_slice(key).get_shape()[0] if key in f.keys() else None
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError):
        return None  # timm's own loading reports it
    w = sd.get(key) if isinstance(sd, dict) else None
    return w.shape[0] if isinstance(w, torch.Tensor) else None


# ---- features ----

class _TimmFeatures:
    """Mixed into timm's class: `features=True` returns timm's intermediates and pre-logits as `Features`."""

    def forward(self, x, features: bool = False):
        if not features:
            return super().forward(x)
        if self._kd_indices:
            final, stages = self.forward_intermediates(x, indices=list(self._kd_indices))
        else:
            final, stages = self.forward_features(x), []
        return Features(self.forward_head(final), stages, self.forward_head(final, pre_logits=True))


def _with_features(model: nn.Module) -> nn.Module:
    reductions = [f["reduction"] for f in getattr(model, "feature_info", None) or []]
    n = len(reductions)
    if not hasattr(model, "forward_intermediates") or not n:
        indices = ()
    elif len(set(reductions)) == 1 and n >= 4:  # one resolution throughout: the last block of each quarter
        indices = tuple(sorted({n // 4 - 1, n // 2 - 1, 3 * n // 4 - 1, n - 1}))
    else:  # the last entry at each reduction
        indices = tuple(i for i in range(n) if i == n - 1 or reductions[i + 1] != reductions[i])
    add_mixin(model, _TimmFeatures)._kd_indices = indices
    return model
