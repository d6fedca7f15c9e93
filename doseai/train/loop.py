"""Shared training machinery: the settings every stage takes, device and precision choice, checkpoints that
resume, a JSON-lines log. Under ``torchrun`` (see :mod:`doseai.train.distributed`) the checkpoints and the log
are written by rank 0 only, and every process reads the same checkpoint to resume."""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from doseai.device import pick_device  # core (prediction uses it too); still importable from here
from doseai.errors import DoseAIError
from doseai.paths import cache_root
from doseai.safe_load import load_checkpoint, plain
from doseai.train.distributed import init_from_environment, is_main_process, main_print, world_size

LR_SCALINGS = ("none", "linear", "sqrt")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """The settings every training stage takes; each stage's config adds its own and sets these defaults.

    The effective batch: each optimizer step covers ``accumulate`` patients in each of the ``torchrun``
    processes, P = accumulate x processes (1 and 1 by default: one patient per step, as always), so an epoch
    takes P x fewer steps. The gradient is the mean over the P patients (DDP averages over processes, each
    process over its ``accumulate`` patients). ``lr_scaling``: "none" (default) keeps ``learning_rate`` as
    the per-step rate whatever P; "linear" multiplies it by P, "sqrt" by sqrt(P) (see :func:`step_learning_rate`).
    """

    run_name: str  # checkpoints and log in <cache>/runs/<run_name>
    epochs: int
    learning_rate: float
    norm_gy: float = 70.0  # doses are divided by this for the network
    device: str = "auto"  # see doseai.device.pick_device
    seed: int = 0
    threads: int | None = None  # torch's CPU threads (None: torch's default)
    accumulate: int = 1  # patients per optimizer step in each process
    lr_scaling: str = "none"  # one of LR_SCALINGS: how the learning rate follows the patients per step
    # one of PRECISIONS: "auto" times a forward with and without bf16 autocast (see bf16_is_faster), so two runs
    # on a CPU with bf16 units may train in different precisions; "fp32" / "bf16" fix it (e.g. to compare runs)
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.accumulate < 1:
            raise DoseAIError(f"accumulate must be at least 1 patient per step, got {self.accumulate}")
        if self.lr_scaling not in LR_SCALINGS:
            raise DoseAIError(f"lr_scaling must be one of {', '.join(LR_SCALINGS)}, got {self.lr_scaling!r}")
        if self.precision not in PRECISIONS:
            raise DoseAIError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def patients_per_step(config: TrainingConfig) -> int:
    """The effective batch: patients per optimizer step over all processes (``accumulate`` x processes)."""
    return config.accumulate * world_size()


def step_learning_rate(config: TrainingConfig) -> float:
    """The (peak) learning rate of a step: ``config.learning_rate`` as it is with ``lr_scaling`` "none", times
    the patients per step with "linear" (the rule of Goyal et al. 2017 for large batches), times its square
    root with "sqrt" (often the better fit for Adam)."""
    factor = {"none": 1.0, "linear": float(patients_per_step(config)),
              "sqrt": float(np.sqrt(patients_per_step(config)))}[config.lr_scaling]
    return config.learning_rate if factor == 1.0 else config.learning_rate * factor


def batch_record(config: TrainingConfig) -> dict:
    """The checkpoint's record of the effective batch, ``{"batch": ...}``, or nothing for the single process
    with one patient per step (whose checkpoints stay as they were)."""
    if patients_per_step(config) == 1 and config.lr_scaling == "none":
        return {}
    return {"batch": {"processes": world_size(), "accumulate": config.accumulate,
                      "patients_per_step": patients_per_step(config), "lr_scaling": config.lr_scaling,
                      "learning_rate": step_learning_rate(config)}}


def start_run(config: TrainingConfig) -> tuple[np.random.Generator, torch.device]:
    """Set the CPU threads and seeds of a run and pick its device (joining the process group when torchrun
    started several processes: :func:`~doseai.train.distributed.init_from_environment`); the random generator
    the run draws from, seeded alike in every process."""
    if config.threads:
        torch.set_num_threads(config.threads)
    return seed_everything(config.seed), init_from_environment(pick_device(config.device))


def cpu_has_bf16_units() -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX), read from /proc/cpuinfo (Linux); True where
    that cannot be read, so that the timing decides."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_faster(forward, example: torch.Tensor, device: torch.device) -> bool:
    """Time ``forward(example)`` with and without bf16 autocast (CPUs without bf16 units get slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if not cpu_has_bf16_units():  # emulated bf16 is ~100x slower: one 3D forward took 190 s against 2 s
        return False
    timings = {}
    with torch.no_grad():
        for use_bf16 in (False, True):
            context = torch.autocast("cpu", dtype=torch.bfloat16) if use_bf16 else nullcontext()
            with context:
                forward(example)  # warm-up
                start = time.perf_counter()
                forward(example)
            timings[use_bf16] = time.perf_counter() - start
    return timings[True] < 0.8 * timings[False]


def choose_bf16(config: TrainingConfig, forward, example: torch.Tensor, device: torch.device) -> bool:
    """Whether the run trains under bf16 autocast: as ``config.precision`` says, timed when it is "auto" (the
    caller broadcasts the answer, so that every process trains in rank 0's precision)."""
    if config.precision == "auto":
        return bf16_is_faster(forward, example, device)
    if config.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DoseAIError("precision bf16 was asked for, but this GPU does not support bf16; use fp32 or auto")
    return config.precision == "bf16"


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled`` (see :func:`bf16_is_faster`), else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def gradient_step(optimizer: torch.optim.Optimizer, parameters, loss: torch.Tensor, max_norm: float = 1.0) -> float:
    """One optimizer step on ``loss`` with the gradient's norm clipped to ``max_norm``; the loss's value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    optimizer.step()
    return float(loss.detach())


class Checkpointer:
    """Saves model/optimizer/step state atomically to ``folder/last.pt`` and resumes from it (writes on rank 0
    only; every process resumes from the same file)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if is_main_process():
            self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "last.pt"

    def save(self, state: dict) -> None:
        """Write ``state`` (e.g. model, optimizer, epoch) to ``last.pt`` so that a crash never leaves half a file
        (rank 0 only: the other processes hold the same weights)."""
        if not is_main_process():
            return
        tmp = self.path.with_suffix(".tmp")
        torch.save(plain(state), tmp)  # plain types only, so that resuming loads it with weights_only=True
        os.replace(tmp, self.path)

    def load(self) -> dict | None:
        """The last saved state (checked to hold model, optimizer and epoch), or None before the first save."""
        return load_checkpoint(self.path, ("model", "optimizer", "epoch")) if self.path.is_file() else None

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Load the last state into ``model`` and ``optimizer``; returns the epoch to start from (0 if none)."""
        state = self.load()
        if not state:
            return 0
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        main_print(f"resuming {self.folder.name} at epoch {state['epoch'] + 1}")
        return state["epoch"] + 1


class JsonLog:
    """Appends one JSON record per line (e.g. one per epoch) to ``path``, each stamped with the time (rank 0
    only)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if is_main_process():
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        """Append ``record``; numpy and torch scalars become plain floats. Other ranks write nothing."""
        if not is_main_process():
            return
        record = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in record.items()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}) + "\n")


def seed_everything(seed: int) -> np.random.Generator:
    """Seed torch and return a numpy generator seeded alike (the run's draws: order, augmentation, samples)."""
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def open_run(run_name: str) -> tuple[Checkpointer, JsonLog]:
    """The checkpoints and the log of run ``run_name`` (``<cache>/runs/<run_name>``)."""
    folder = cache_root() / "runs" / run_name
    return Checkpointer(folder), JsonLog(folder / "log.jsonl")
