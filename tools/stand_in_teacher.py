"""A stand-in for a published teacher's checkpoint, for smoke runs without the real file: random weights in the
reference's layout (RepDistiller's; a library model's own state dict, as torchvision publishes it). Usage:
python tools/stand_in_teacher.py MODEL PATH [NUM_CLASSES [IMAGE_SIZE]], e.g.
`python tools/stand_in_teacher.py resnet56 published/resnet56.pth 100` (defaults: 10 classes, 32 px)."""

import sys
from pathlib import Path


def published_checkpoint(model_name: str, path: Path, num_classes: int = 10, size: int = 32) -> None:
    """Writes the stand-in for `model_name` to `path`. Its BN statistics are calibrated on noise images of
    `size` px: with untrained statistics deep features explode and FSP diverges."""
    import torch

    from kdpipe import models
    from kdpipe.import_teacher import to_reference

    torch.manual_seed(0)
    model = models.create(model_name, num_classes)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, 3, size, size))
    path.parent.mkdir(parents=True, exist_ok=True)
    if model_name.startswith(tuple(models.LIBRARIES)):
        torch.save(model.state_dict(), path)
    else:
        torch.save({"model": to_reference(model_name, model.state_dict()), "epoch": 240, "accuracy": 0.0}, path)


if __name__ == "__main__":
    model_name, path, *sizes = sys.argv[1:]
    published_checkpoint(model_name, Path(path), *map(int, sizes))
