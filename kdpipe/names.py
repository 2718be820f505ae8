"""What runs and models are called: a model's display name in tables and plots, and the run names of the full
pipelines (the names their dvc.yaml gives the checkpoints, metrics and curves)."""

PRETTY = {"resnet8x4": "ResNet-8x4", "resnet32x4": "ResNet-32x4", "resnet50": "ResNet-50", "mobilenetv2": "MobileNetV2",
          "shufflev1": "ShuffleNetV1", "shufflev2": "ShuffleNetV2"}


def pretty(model: str) -> str:
    if model in PRETTY:
        return PRETTY[model]
    if model.startswith("wrn_"):
        return "WRN-" + model[4:].replace("_", "-")
    if model.startswith("vgg"):
        return "VGG-" + model[3:]
    if model.startswith("resnet"):
        return "ResNet-" + model.removeprefix("resnet")
    return model  # a library's model (tv/resnet50, timm/...) keeps its name


def trained_run(recipe: str, model: str, seed: int) -> str:
    """The run name of a model trained from scratch (or a published teacher) in the full pipelines."""
    return f"{recipe}-{model}-s{seed}"


def distill_run(method: str, teacher: str, student: str, seed: int) -> str:
    return f"{method}-{teacher}-{student}-s{seed}"



# the INT8 files of a run NAME beside its fp32 export models/NAME.onnx: models/NAME<suffix>.onnx and
# metrics/NAME<suffix>.json, suffix -> the command that writes them
INT8_FILES = {".int8": "kdpipe quantize", ".qat": "kdpipe qat"}


def model_file(name: str) -> tuple[str, str | None]:
    """(the run, its INT8 suffix or None) of a model file's name: kd.int8 -> (kd, .int8), kd -> (kd, None)."""
    suffix = next((s for s in INT8_FILES if name.endswith(s)), None)
    return (name.removesuffix(suffix), suffix) if suffix else (name, None)
