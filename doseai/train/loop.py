"""Shared training machinery: device and precision choice, checkpoints that resume, a JSON-lines log."""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from doseai.safe_load import load_checkpoint, plain


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def bf16_is_faster(forward, example: torch.Tensor, device: torch.device) -> bool:
    """Time ``forward(example)`` with and without bf16 autocast (CPUs without bf16 units get slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
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
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


class Checkpointer:
    """Saves model/optimizer/step state atomically to ``folder/last.pt`` and resumes from it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "last.pt"

    def save(self, state: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(plain(state), tmp)  # plain types only, so that resuming loads it with weights_only=True
        os.replace(tmp, self.path)

    def load(self) -> dict | None:
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
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        record = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in record.items()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}) + "\n")


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)
