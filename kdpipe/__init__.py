"""kdpipe: teacher -> student knowledge distillation on CIFAR-scale models, as a declarative DVC pipeline."""

__version__ = "0.1.0"


def load_model(path):
    """The model of any kdpipe checkpoint (trained by kdpipe or imported), in eval mode, on the CPU.
    Its inputs are RGB images scaled to 0..1 and normalised with `torch.load(path)["normalization"]`."""
    from .checkpoint import load_checkpoint, restore_model

    return restore_model(load_checkpoint(path)).eval()
