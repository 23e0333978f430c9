"""Process-group setup for torchrun (gloo on CPU, nccl on GPU), device selection and rank-0 guards.

Nothing here reads the environment at import time: callers ask for the DistInfo when they need it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from utils.core.errors import UserError

LOGGER = logging.getLogger("yolov5kd")


def de_parallel(model: nn.Module) -> nn.Module:
    """The bare model inside a DataParallel / DistributedDataParallel wrapper."""
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = -1  # -1: not distributed
    local_rank: int = -1
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.rank != -1

    @property
    def is_main(self) -> bool:
        return self.rank in (-1, 0)


def dist_info_from_env() -> DistInfo:
    """Read torchrun's LOCAL_RANK / RANK / WORLD_SIZE (call once, from main)."""
    return DistInfo(rank=int(os.getenv("RANK", -1)), local_rank=int(os.getenv("LOCAL_RANK", -1)),
                    world_size=int(os.getenv("WORLD_SIZE", 1)))


def select_device(device: str = "", batch_size: int = 0, info: DistInfo | None = None) -> torch.device:
    """'' → first CUDA device if any else CPU; 'cpu'; '0' or '0,1' (CUDA indices); under DDP the local rank's GPU."""
    given = str(device).strip()  # as typed, for messages
    device = given.lower().replace("cuda:", "").replace("none", "")
    if device == "cpu" or (device == "" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if device == "mps":
        return torch.device("mps")
    parts = [x.strip() for x in device.split(",")] if device else ["0"]
    if device == "cuda":
        parts = ["0"]
    if not all(x.isdigit() for x in parts):
        raise UserError(f"--device {given}: not a device (use cpu, cuda, 0, cuda:0 or 0,1,2,3)")
    if not torch.cuda.is_available():
        raise UserError(f"--device {given}: CUDA is not available on this machine (use --device cpu)")
    ids = [int(x) for x in parts]
    n = torch.cuda.device_count()
    if any(i >= n for i in ids):
        raise UserError(f"--device {given}: only {n} CUDA device(s) visible")
    if info is not None and info.distributed:
        return torch.device("cuda", info.local_rank)
    return torch.device("cuda", ids[0])


def init_distributed(info: DistInfo, device: torch.device, batch_size: int) -> None:
    """Start the process group for a torchrun launch; checks the batch divides across ranks."""
    if not info.distributed:
        return
    if batch_size % info.world_size:
        raise UserError(f"--batch-size {batch_size} must be a multiple of WORLD_SIZE {info.world_size}")
    backend = "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(hours=3))
    LOGGER.info(f"DDP: rank {info.rank}/{info.world_size} on {device} ({backend})")


def cleanup_distributed(info: DistInfo) -> None:
    """Destroy the process group if one was started."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_process_first(info: DistInfo):
    """Let rank 0 do a job (e.g. build the label cache) before the other ranks repeat it from the result."""
    if info.distributed and info.rank != 0:
        dist.barrier()
    yield
    if info.distributed and info.rank == 0:
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's value of a boolean, on every rank (e.g. the early-stop decision)."""
    if not info.distributed:
        return flag
    obj = [flag]
    dist.broadcast_object_list(obj, src=0)
    return bool(obj[0])
