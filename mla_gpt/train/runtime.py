"""Where and how a process runs: device, dtype, its place in a torchrun (DDP) job, its GPU's peak.

`resolve_runtime(cfg)` turns the device, dtype and backend keys into a Runtime (starting
torch.distributed when torchrun launched the process); sample and convert use `resolve_device` and
`resolve_dtype` alone.
"""

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mla_gpt.cli.configurator import ConfigError
from mla_gpt.model.gpt import A100_BF16_PEAK_FLOPS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts), by device-name fragment:
# the MFU of a run is reported against the GPU it runs on, or not at all.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": A100_BF16_PEAK_FLOPS, "L40S": 362e12, "L4": 121e12,
                   "A10G": 70e12}


@dataclass
class Runtime:
    """Where and how this process runs."""

    device: str
    device_type: str
    ptdtype: torch.dtype
    ddp: bool
    rank: int
    local_rank: int
    world_size: int

    @property
    def master(self):
        return self.rank == 0


def available_devices():
    """The device names this machine can run on: 'cpu', then 'cuda', 'cuda:1', ... and 'mps'."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(device):
    """'auto' -> 'cuda' when a GPU is there, else 'cpu'; a device this machine lacks is a ConfigError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    available = available_devices()
    if device not in available:
        raise ConfigError(f"device {device!r} is not available on this machine; available: {', '.join(available)}")
    return device


def resolve_dtype(dtype, device_type):
    """'auto' -> bfloat16 on GPUs that have it, float16 on other GPUs, float32 elsewhere."""
    if dtype == "auto":
        if device_type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype expects one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def resolve_runtime(cfg):
    """Pick device and dtype, start torch.distributed when launched by torchrun."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = resolve_device(cfg["device"])
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        backend = (
            cfg["backend"] if cfg["backend"] != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        )
        dist.init_process_group(backend=backend)
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    dtype = resolve_dtype(cfg["dtype"], device_type)
    return Runtime(device, device_type, dtype, ddp, rank, local_rank, world_size)


def bf16_peak(device):
    """(name, FLOP/s) of the device's datasheet bf16 peak, or None where none is known (CPU too)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    for model, flops in BF16_PEAK_FLOPS.items():
        if re.search(rf"\b{model}\b", name):  # whole words: "L4" is not "L40"
            return name, flops
    return None
