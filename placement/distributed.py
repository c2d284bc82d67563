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
import re
import shutil
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import PlacementError

DIST_TIMEOUT = 300.0  # seconds: a launcher's rank that did not start is named within minutes, not never


def _env_int(name: str, default: int, low: int = 0) -> int:
    """A launch variable as a number; anything else is one line naming it."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise PlacementError(f"{name}={text!r} is not a whole number of at least {low}: start the command with "
                             f"torchrun or accelerate launch, or unset {name}")
    return value


def launched() -> bool:
    """Started by a launcher with more than one process."""
    return _env_int("WORLD_SIZE", 1, low=1) > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    return rank_and_world()[0] == 0


def local_device(device: str) -> str:
    """The device of this rank: under a launcher on GPUs, `cuda` means this process's own GPU (LOCAL_RANK)."""
    if launched() and device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{_env_int('LOCAL_RANK', 0)}"
    return device


def start(device: str = "cpu", timeout: float = DIST_TIMEOUT) -> tuple[int, int]:
    """Join the launcher's process group (once), waiting at most `timeout` seconds for the other ranks (and as long
    at every exchange after); (rank, world size), (0, 1) without a launcher."""
    if not launched() or dist.is_initialized():
        return rank_and_world()
    world = _env_int("WORLD_SIZE", 1, low=1)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise PlacementError(f"WORLD_SIZE is {world} but {missing[0]} is not set: start the "
                             "command with torchrun or accelerate launch, or unset WORLD_SIZE")
    rank = _env_int("RANK", 0)
    if rank >= world:
        raise PlacementError(f"RANK={rank} is not below WORLD_SIZE={world}: start the command with torchrun or "
                             "accelerate launch")
    _env_int("MASTER_PORT", 0)
    gpu = local_device(device).startswith("cuda")
    if gpu:
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    try:
        with _native_stderr_silenced():  # torch's C++ store logs every retry, frames and all, to stderr
            dist.init_process_group("nccl" if gpu else "gloo", timeout=timedelta(seconds=timeout))
    except dist.DistError as err:  # the store timed out or could not be reached
        raise PlacementError(_absent(rank, world, timeout, str(err))) from None
    return rank_and_world()


@contextlib.contextmanager
def _native_stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _absent(rank: int, world: int, timeout: float, error: str) -> str:
    """One line for a process group that never formed: which rank waited, and which did not come."""
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if rank == 0:
        joined = re.search(r"(\d+)/\d+ clients joined", error)
        came = f" ({joined[1]} of {world} joined)" if joined else ""
        absent = "rank 1" if world == 2 else f"some of ranks 1 to {world - 1}"
    else:
        came, absent = "", "rank 0"
    return (f"rank {rank} waited {timeout:g} s at {where} and {absent} did not come{came}: start all {world} "
            "processes with torchrun or accelerate launch, or give them longer with --dist-timeout")


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
