"""Loss numerics shared by every objective (teachers, students, distillation): the `fp32` decorator and
the classification term. Kept apart from `kdpipe.distill` so training a teacher does not depend on it.

Under bf16 autocast `torch.bmm` runs in bf16 even on `.float()` inputs: NST of a student within 5 % of
its teacher came out ~20x too large, its gradient ~21 % off. So every loss runs with autocast off and
its floating-point inputs cast to fp32, whatever region it is called from.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _to_float(v):
    if isinstance(v, torch.Tensor):
        return v.float() if v.is_floating_point() else v
    if isinstance(v, (list, tuple)):
        return type(v)(_to_float(x) for x in v)
    return v


def fp32(fn):
    """Run a loss with autocast switched off and its floating-point tensor inputs cast to fp32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*_to_float(args), **{k: _to_float(v) for k, v in kwargs.items()})

    wrapper.fp32 = True
    return wrapper


@fp32
def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """The classification term of every objective (teachers, students, distillation), in fp32."""
    return F.cross_entropy(logits, target)
