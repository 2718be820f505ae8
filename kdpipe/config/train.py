"""The training sections (`teacher`, `student`, `table`, named `recipes`) and `evaluate`: optimiser, schedule,
runtime."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from .base import ModelName, Strict

# decoding processes of a streamed source: a count, or "auto" (sources.open_source resolves it on the machine)
Workers = Union[Annotated[int, Field(ge=0)], Literal["auto"]]


class Optim(Strict):
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    # norm_and_bias: no weight decay on 1-D parameters (norm layers' weights and biases, every bias), as
    # timm-style trainers filter them (DIST's ImageNet recipe); none: every parameter decays
    no_decay: Literal["none", "norm_and_bias"] = "none"
    # the global batch `lr` is set for: another batch_size scales it linearly (Goyal et al. 2017, as the ImageNet
    # recipes: 0.1 per 256 images); null: `lr` as it is
    lr_batch: Optional[int] = Field(None, ge=1)
    # the lr of particular models, overriding `lr` (RepDistiller trains MobileNetV2 and the ShuffleNets,
    # as teachers or students, at 0.01 instead of 0.05)
    lr_by_model: dict[ModelName, float] = {}

    @field_validator("lr_by_model")
    @classmethod
    def _positive(cls, v: dict) -> dict:
        if any(lr <= 0 for lr in v.values()):
            raise ValueError("learning rates must be > 0")
        return v


class Schedule(Strict):
    milestones: list[float] = Field([0.5, 0.75], description="fractions of training where lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < m < 1 for m in v) or v != sorted(v):
            raise ValueError("must be increasing fractions of training strictly between 0 and 1")
        return v


class CpuPin(Strict):
    """Same bits on every x86-64 machine: torch picks CPU kernels by instruction set (ATen's vectorised
    code, oneDNN's convolutions), and reductions split by thread count; both change the rounding."""

    cpu_isa: Literal["native", "avx2"] = "native"  # avx2: pin ATen and oneDNN to AVX2 kernels
    cpu_threads: Optional[int] = Field(None, ge=1)  # null: torch's default (the number of cores)


class Runtime(CpuPin):
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    bf16: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA, off for CPU (exact fp32)
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA and a native-ISA CPU, off under cpu_isa avx2
    # true: torch.compile (inductor) of the model and kdpipe distill's teacher forward; reduce-overhead: and, on CUDA,
    # replayed as CUDA graphs
    compile: Union[bool, Literal["reduce-overhead"]] = False
    sync_bn: bool = False  # under torchrun: SyncBatchNorm instead of per-rank BN statistics (CUDA only)
    workers: Workers = Field(2, description="data: source stream: decoding processes, or auto: the cores this "
                                           "process may use (results do not depend on it)")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile(cls, v):
        if v not in (True, False, "reduce-overhead") or not isinstance(v, (bool, str)):
            raise ValueError("must be true, false or reduce-overhead")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v


class Recipe(Strict):
    """A named training recipe (e.g. he2016); a `teacher`/`student` section picks one with
    `recipe: NAME`, and any key the section sets itself overrides the recipe's."""

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=2)
    optim: Optim
    schedule: Schedule


class Train(Strict):
    recipe: Optional[str] = None  # the recipe this section was built from (already merged in)
    model: ModelName = "resnet20"
    # tv/ and timm/ models: null (the architecture's init), a weights name (torchvision's IMAGENET1K_V1,
    # DEFAULT, ...; timm's `pretrained` or a tag) or a state-dict file (.pth/.pt/.safetensors)
    weights: Optional[str] = None
    seed: int = Field(0, ge=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2)
    optim: Optim = Optim()
    schedule: Schedule = Schedule()
    runtime: Runtime = Runtime()

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.schedule.warmup_epochs >= self.epochs:
            raise ValueError("schedule.warmup_epochs must be smaller than epochs")
        return self

    @property
    def lr(self) -> float:
        """The base learning rate of the model this section trains (`optim.lr_by_model` first), scaled to the
        global batch where `optim.lr_batch` says which batch it is set for."""
        lr = self.optim.lr_by_model.get(self.model, self.optim.lr)
        return lr if self.optim.lr_batch is None else lr * self.batch_size / self.optim.lr_batch


# --- evaluation -----------------------------------------------------------------------------------
class Evaluate(CpuPin):
    batch_size: int = Field(1000, ge=1)
    device: str = "auto"
    workers: Workers = Field(2, description="data: source stream: decoding processes, or auto (the cores this "
                                           "process may use)")
