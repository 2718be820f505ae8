"""Where and how a run computes: the device, bf16 and channels_last switches, CPU pinning, determinism,
and DistributedDataParallel under torchrun. Nothing here changes what a run computes on the CPU's default
settings (fp32, contiguous, one process); it decides where and in which number format."""

from __future__ import annotations

import os
import platform
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .config import Error


class TrainingError(Error):
    pass


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {spec!r} requested but CUDA is not available")
    return torch.device(spec)


def _switch(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "on"


@dataclass(frozen=True)
class Numerics:
    device: torch.device
    bf16: bool
    channels_last: bool

    @classmethod
    def from_runtime(cls, runtime, local_rank: int = 0) -> "Numerics":
        device = resolve_device(runtime.device)
        if device.type == "cuda" and device.index is None:  # one GPU per process: torchrun's LOCAL_RANK
            device = torch.device("cuda", local_rank)
        # bf16 `auto`: on for CUDA only, so CPU results stay exact fp32. channels_last `auto`: on for CUDA and for a
        # CPU at its native ISA (1.3x per fp32 step on oneDNN, other rounding); off under `cpu_isa: avx2`, whose
        # promise is the same bits on every AVX2 machine, verified across machines for the default layout only
        cuda = device.type == "cuda"
        return cls(device, _switch(runtime.bf16, cuda),
                   _switch(runtime.channels_last, cuda or runtime.cpu_isa == "native"))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


# ATen's vectorised kernels, oneDNN's convolutions, and MKL's GEMMs (linear layers, matmuls), which follow neither
# of the first two: its conditional-reproducibility branch COMPATIBLE (SSE2 without the vendor-specific rcpps/rsqrtps)
# is the one documented to give the same results on Intel and other x86-64 CPUs
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE"}


def pin_cpu(cfg) -> None:
    """Apply `runtime.cpu_isa` / `cpu_threads` (config.CpuPin). Must run before the process's first
    torch op: ATen and oneDNN read their instruction-set limits once, at first use."""
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    if cfg.cpu_isa == "native":
        return
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise TrainingError(f"cpu_isa: {cfg.cpu_isa} needs an x86-64 CPU (this is {platform.machine()}); use native")
    os.environ.update(AVX2_ENV)
    got = torch.backends.cpu.get_cpu_capability()
    if got != "AVX2":
        raise TrainingError(f"cpu_isa: avx2 requested but torch runs {got} kernels in this process "
                            "(a CPU without AVX2, or torch ops ran before kdpipe could pin the ISA)")


def set_determinism(device: torch.device) -> None:
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
        # deterministic mode also fills every new tensor with NaN (a debugging aid against reading uninitialised
        # memory): a fifth of a ResNet-20 step on 2 cores, and no kernel's result depends on it
        torch.utils.deterministic.fill_uninitialized_memory = False
    else:  # on CUDA we prefer cuDNN autotuning: fast, reproducible in distribution but not bitwise
        torch.backends.cudnn.benchmark = True


# --- multi-GPU: DistributedDataParallel under torchrun -----------------------------------------------
@dataclass(frozen=True)
class Ranks:  # this process among the DDP processes (torchrun), or the one process
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def processes() -> Ranks:
    """This process's place among torchrun's (WORLD_SIZE/RANK/LOCAL_RANK); one process (the default) needs nothing."""
    env = os.environ
    return Ranks(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))


@dataclass(frozen=True)
class Context:
    """Where a run computes, built once per process by `context` and handed to everything that places tensors:
    the processes, the device (under torchrun cuda:LOCAL_RANK, made the current device before NCCL starts, so
    the data, the teacher, the student and NCCL's buffers share it) and the number format."""

    dist: Ranks
    numerics: Numerics


def context(cfg) -> Context:
    """The run context of a `runtime` params section (config.Runtime): pins the CPU, picks and sets the device,
    joins torchrun's process group, and switches on determinism."""
    pin_cpu(cfg)
    ddp = processes()
    numerics = Numerics.from_runtime(cfg, ddp.local_rank)
    if numerics.device.type == "cuda":
        torch.cuda.set_device(numerics.device)
    if ddp.world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if numerics.device.type == "cuda" else "gloo")
        ddp = Ranks(dist.get_rank(), dist.get_world_size(), ddp.local_rank)
    set_determinism(numerics.device)
    return Context(ddp, numerics)


def all_sum(t: torch.Tensor, ddp: Ranks) -> torch.Tensor:
    if ddp.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def barrier(ddp: Ranks) -> None:
    if ddp.world > 1:
        import torch.distributed as dist

        dist.barrier()


def wrap(model: nn.Module, ddp: Ranks, numerics: Numerics, mode: bool | str, sync_bn: bool, unused_params: bool):
    """(model, forward_model): the model on its device and layout (SyncBatchNorm under DDP where asked), and
    what the loop calls forward on — the same model, or it wrapped by DistributedDataParallel and/or
    torch.compile (`mode`: runtime.compile; "reduce-overhead" is torch.compile's mode of that name, CUDA graphs on
    CUDA and plain inductor on the CPU). Checkpoints always hold `model`'s own state dict."""
    if ddp.world > 1 and sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = numerics.prepare_model(model)
    forward_model = model
    if ddp.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        dev = numerics.device
        forward_model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                find_unused_parameters=unused_params)
    if mode:
        forward_model = compiled(forward_model, mode)
    return model, forward_model


def compiled(model: nn.Module, mode: bool | str) -> nn.Module:
    """`model` through torch.compile as runtime.compile asks (True, or "reduce-overhead": CUDA graphs on CUDA), with
    static shapes: a graph per batch size (the engine builds them all before its epochs)."""
    return torch.compile(model, dynamic=False, mode=mode if isinstance(mode, str) else None)


def compiled_graphs() -> int:
    """How many graphs torch.compile has compiled in this process (a recompilation adds one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
