"""kdpipe: teacher -> student knowledge distillation on CIFAR-scale models, as a declarative DVC pipeline."""

import os

__version__ = "0.1.0"

# OpenMP threads that wait for work sleep instead of spinning (read once, when torch loads its OpenMP
# runtime, so before any torch import): on a machine where another job holds a core, spinning threads
# steal it back and training ran at a third of its share; asleep, at its share. Idle it costs ~6 %, and
# the arithmetic (the bits) is the same. OMP_WAIT_POLICY=ACTIVE in the environment restores spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_model(path):
    """The model of any kdpipe checkpoint (trained by kdpipe or imported), in eval mode, on the CPU.
    Its inputs are RGB images scaled to 0..1 and normalised with `torch.load(path)["normalization"]`."""
    from .engine import load_checkpoint, restore_model

    return restore_model(load_checkpoint(path)).eval()
