"""Data-parallel training over several processes (``torchrun``; torch.distributed and DistributedDataParallel).

Launched by ``torchrun --nproc_per_node N [--nnodes M ...] -m doseai.cli train prior|preference|dvh ...``
(WORLD_SIZE > 1 in the environment), :func:`init_from_environment` joins the process group from torchrun's
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL on CUDA, each process on
cuda:LOCAL_RANK, gloo on the CPU. Without them (or with WORLD_SIZE 1) every helper here is a no-op and a run
is the single process it always was.

Every process draws the same patient permutation per epoch (same seed) and takes its share by the
distributed-sampler rule (:func:`step_positions`), so one synchronous step covers WORLD_SIZE patients (times the
stage's ``accumulate``) and DDP averages their gradients. Logging, checkpoints and any other file writes happen
on rank 0 (:func:`is_main_process`); every process resumes from the same checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from doseai.errors import DoseAIError

_STARTED_HERE = False  # whether init_from_environment started the process group (then shutdown ends it)


def launched_by_torchrun() -> bool:
    """Whether the environment asks for several processes (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of processes training together (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """This process's rank on its node (torchrun's LOCAL_RANK; the global rank when it is not set)."""
    return int(os.environ.get("LOCAL_RANK", rank()))


def is_main_process() -> bool:
    """Whether this process logs, prints and writes files (rank 0; always true in a single process)."""
    return rank() == 0


def main_print(*args, **kwargs) -> None:
    """``print`` on rank 0 only (N copies of each line help nobody)."""
    if is_main_process():
        print(*args, **kwargs)


def init_from_environment(device: torch.device) -> torch.device:
    """Join the process group when torchrun launched this process and none exists yet (NCCL for a CUDA
    ``device``, gloo otherwise; ``env://``); the device this process trains on: cuda:LOCAL_RANK on CUDA with
    several processes, else ``device``. A process group that already exists (e.g. started by a test with
    ``init_method="file://..."``) is used as it is."""
    global _STARTED_HERE
    if launched_by_torchrun() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank())  # before NCCL starts, so that each rank opens its own GPU
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _STARTED_HERE = True
    if is_distributed() and device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    return device


def shutdown() -> None:
    """End the process group if :func:`init_from_environment` started it (one started elsewhere is left)."""
    global _STARTED_HERE
    if _STARTED_HERE and dist.is_initialized():
        dist.destroy_process_group()
    _STARTED_HERE = False


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first and the others after it, e.g. around a cache that the first one writes."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every process (picklable; for choices that must agree, e.g. timed ones)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list:
    """Every process's ``value`` (picklable), in rank order; ``[value]`` in a single process."""
    if not is_distributed():
        return [value]
    values: list = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def all_processes(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (so that all of them take the same branch)."""
    return all(gather(bool(flag))) if is_distributed() else bool(flag)


def step_positions(count: int, accumulate: int = 1, rank_: int | None = None,
                   world: int | None = None) -> list[list[int]]:
    """This process's positions in a permutation of ``count`` patients, grouped by optimizer step.

    The distributed-sampler rule: the last ``count % world`` positions are left out (each epoch other patients,
    the permutation being new), so that every process takes as many steps; process r takes positions r,
    r + world, ...; a step takes ``accumulate`` of them (the epoch's last step fewer when they do not divide).
    Step s of all processes together then covers positions s x world x accumulate to (s + 1) x world x
    accumulate - 1: the patients one process with ``accumulate`` = world x ``accumulate`` takes in its step s.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if accumulate < 1:
        raise DoseAIError(f"accumulate must be at least 1, got {accumulate}")
    if count < world:
        raise DoseAIError(f"{count} training patients cannot be shared among {world} processes")
    mine = list(range(rank_, count - count % world, world))
    return [mine[start:start + accumulate] for start in range(0, len(mine), accumulate)]


class StepModule(torch.nn.Module):
    """``loss(net, *args, **kwargs)`` as a module's forward: DDP synchronises gradients only for work done inside
    its forward, and the training steps call several methods of their network (encoder, latent, decoder)."""

    def __init__(self, net: torch.nn.Module, loss: Callable):
        super().__init__()
        self.net = net
        self.loss = loss

    def forward(self, *args, **kwargs):
        """The step's loss (and whatever else ``loss`` returns) for ``self.net``."""
        return self.loss(self.net, *args, **kwargs)


def wrap(module: torch.nn.Module, device: torch.device, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when this is one of several processes, else ``module`` itself.
    DDP copies rank 0's parameters and buffers to the others here. ``find_unused_parameters``: some trainable
    parameters may get no gradient in a step (DDP then finds them at each step, at some cost)."""
    if not is_distributed():
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def gradient_sync(module: torch.nn.Module, sync: bool):
    """Context for one forward and backward of an accumulated step: without ``sync`` (all but the step's last
    patient) DDP keeps the gradients local and the last backward averages their sum across processes."""
    return module.no_sync() if isinstance(module, DistributedDataParallel) and not sync else nullcontext()


def backward_share(loss: torch.Tensor, patients: int) -> None:
    """Backpropagate one of the ``patients`` losses of this process's step, so that the accumulated gradient is
    their mean (DDP then averages over the processes). One patient: ``loss.backward()`` as before, bit for bit."""
    (loss / patients if patients > 1 else loss).backward()


@contextmanager
def local_codebooks(module: torch.nn.Module) -> Iterator[None]:
    """MONAI's EMA vector quantizers all-reduce their codebook statistics in every training forward once a
    process group exists. Inside this block each process updates its own codebook, e.g. for a timing forward of
    the same example on every process: each then makes the single process's update and none waits for the
    others."""
    quantizers = [m for m in module.modules() if getattr(m, "ddp_sync", False) is True]
    for quantizer in quantizers:
        quantizer.ddp_sync = False
    try:
        yield
    finally:
        for quantizer in quantizers:
            quantizer.ddp_sync = True
