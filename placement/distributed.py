"""torch.distributed as the launchers start it. `torchrun` and `accelerate launch` set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; every command joins that group (nccl on GPUs, gloo on the CPU) and runs the same code
on every rank, so every collective is met. The probe gives each rank a share of the calibration batches and sums
its accumulators over ranks; training splits each global batch over ranks under DistributedDataParallel. Only rank
0 writes: the other ranks write into a private temporary folder that is deleted when the command ends, and print
nothing.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist

from .errors import PlacementError


def launched() -> bool:
    """Started by a launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    return rank_and_world()[0] == 0


def local_device(device: str) -> str:
    """The device of this rank: under a launcher on GPUs, `cuda` means this process's own GPU (LOCAL_RANK)."""
    if launched() and device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def start(device: str = "cpu") -> tuple[int, int]:
    """Join the launcher's process group (once); (rank, world size), (0, 1) without a launcher."""
    if not launched() or dist.is_initialized():
        return rank_and_world()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise PlacementError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {missing[0]} is not set: start the "
                             "command with torchrun or accelerate launch, or unset WORLD_SIZE")
    gpu = local_device(device).startswith("cuda")
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if gpu else "gloo")
    return rank_and_world()


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (gloo reduces host tensors), on the tensor's own device; itself on one process."""
    if not dist.is_initialized():
        return value
    moved = value if dist.get_backend() == "nccl" else value.cpu()
    dist.all_reduce(moved)
    return moved.to(value.device)


@contextlib.contextmanager
def rank_outputs(out: str | None):
    """Where this rank writes: `out` on rank 0; on the others a private temporary folder (deleted at the end), with
    stdout silenced, so every rank runs the same code and meets the same collectives."""
    if out is None or is_main():
        yield out
        return
    private = tempfile.mkdtemp(prefix="placement-rank-")
    stdout = sys.stdout
    sys.stdout = open(os.devnull, "w")
    try:
        yield os.path.join(private, "out")
    finally:
        sys.stdout.close()
        sys.stdout = stdout
        shutil.rmtree(private, ignore_errors=True)
