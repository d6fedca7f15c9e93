"""Shared training machinery: the settings every stage takes, device and precision choice, checkpoints that
resume, a JSON-lines log."""

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
from doseai.paths import cache_root
from doseai.safe_load import load_checkpoint, plain


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """The settings every training stage takes; each stage's config adds its own and sets these defaults."""

    run_name: str  # checkpoints and log in <cache>/runs/<run_name>
    epochs: int
    learning_rate: float
    norm_gy: float = 70.0  # doses are divided by this for the network
    device: str = "auto"  # see doseai.device.pick_device
    seed: int = 0
    threads: int | None = None  # torch's CPU threads (None: torch's default)


def start_run(config: TrainingConfig) -> tuple[np.random.Generator, torch.device]:
    """Set the CPU threads and seeds of a run and pick its device; the random generator the run draws from."""
    if config.threads:
        torch.set_num_threads(config.threads)
    return seed_everything(config.seed), pick_device(config.device)


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


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when ``enabled`` (see :func:`bf16_is_faster`), else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


class Checkpointer:
    """Saves model/optimizer/step state atomically to ``folder/last.pt`` and resumes from it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "last.pt"

    def save(self, state: dict) -> None:
        """Write ``state`` (e.g. model, optimizer, epoch) to ``last.pt`` so that a crash never leaves half a file."""
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
        print(f"resuming {self.folder.name} at epoch {state['epoch'] + 1}")
        return state["epoch"] + 1


class JsonLog:
    """Appends one JSON record per line (e.g. one per epoch) to ``path``, each stamped with the time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        """Append ``record``; numpy and torch scalars become plain floats."""
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
