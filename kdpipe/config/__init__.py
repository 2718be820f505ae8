"""params.yaml's schemas, the one place where every key, its type and its range live: one file per section
(data, train, distill, deploy), the whole file (params), reading it (load) and the errors (errors).

`load_params(path)` validates the whole file (unknown keys are errors, so a typo never silently
falls back to a default) and raises `ParamsError` with one line per problem, naming the full key path.
"""

from .base import ModelName, Strict
from .data import FOLDER_DATASETS, Data, Manifest, Synthetic
from .deploy import Measure, Qat, Quantize
from .distill import METHODS, RECIPE_KEYS, Distill, MethodParams, epoch_keys, parse_methods, parse_run
from .errors import Error, ParamsError, UsageError
from .load import load_params, validate
from .params import DEPLOY_SECTIONS, TRAIN_SECTIONS, Pair, Params
from .train import CpuPin, Evaluate, Optim, Recipe, Runtime, Schedule, Train

__all__ = [
    "ModelName", "Strict", "FOLDER_DATASETS", "Data", "Manifest", "Synthetic", "Measure", "Qat", "Quantize", "METHODS", "epoch_keys",
    "RECIPE_KEYS", "Distill", "MethodParams", "parse_methods", "parse_run", "Error", "ParamsError",
    "UsageError", "load_params", "validate", "DEPLOY_SECTIONS", "TRAIN_SECTIONS", "Pair", "Params", "CpuPin", "Evaluate", "Optim",
    "Recipe", "Runtime", "Schedule", "Train",
]
