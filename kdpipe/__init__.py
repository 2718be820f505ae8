"""kdpipe: teacher -> student knowledge distillation for CIFAR ResNets, as a declarative DVC pipeline."""

__version__ = "0.1.0"
