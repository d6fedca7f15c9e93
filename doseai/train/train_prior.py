"""Stage I training: the VQ-VAE dose prior on every OpenKBP training dose (patients without CT too).

Resumable: state is checkpointed to ``<cache>/runs/<name>/last.pt`` every epoch; re-running continues.
Validation doses are used only to report reconstruction MAE, never for training.

A step's patients (``accumulate`` per process, see :class:`~doseai.train.loop.TrainingConfig`) go through the
VQ-VAE as one batch: it has no batch statistics, so the gradient is the mean of the patients' gradients, and
its EMA codebook takes one update from their pooled statistics, as it does across ``torchrun`` processes (MONAI's
quantizer all-reduces them). One process with ``accumulate`` N therefore trains as N processes do (up to
rounding: a batch sums in another order than N processes).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from doseai.models.dose_prior import DEFAULT_PRIOR_CONFIG, build_dose_prior
from doseai.models.features import GridSpec
from doseai.models.onednn import route_convolutions_to_onednn
from doseai.train.dataset import load_split
from doseai.train.distributed import (barrier, broadcast, gather, is_main_process, local_codebooks,
                                      main_process_first, step_positions, wrap)
from doseai.train.loop import (TrainingConfig, autocast, batch_record, choose_bf16, open_run, start_run,
                               step_learning_rate)


def _draw_augmentation(rng: np.random.Generator) -> tuple[bool, tuple[int, int, int]]:
    """The random part of :func:`_augment`: (flip, shift along z, y, x)."""
    flip = bool(rng.random() < 0.5)
    return flip, tuple(int(s) for s in rng.integers(-4, 5, size=3))


def _apply_augmentation(batch: np.ndarray, draw: tuple[bool, tuple[int, int, int]]) -> np.ndarray:
    """``batch`` flipped and shifted as ``draw`` (from :func:`_draw_augmentation`) says."""
    flip, shift = draw
    return np.roll(batch[..., ::-1] if flip else batch, shift, axis=(-3, -2, -1))


def _augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Left-right flip and small shifts (doses are not symmetric, but a mirrored plan is still a plan)."""
    return _apply_augmentation(batch, _draw_augmentation(rng))


@torch.no_grad()
def reconstruction_mae_gy(model, doses: np.ndarray, device, use_bf16: bool, norm_gy: float) -> float:
    """Mean absolute reconstruction error in Gy over voxels that hold dose in the reference."""
    model.eval()
    errors = []
    for dose in doses:
        x = torch.from_numpy(dose[np.newaxis].astype(np.float32)).to(device)
        with autocast(device, use_bf16):
            reconstruction, _ = model(x)
        mask = x > 0
        errors.append(float((reconstruction.float() - x).abs()[mask].mean()) * norm_gy)
    model.train()
    return float(np.mean(errors))


@dataclass(frozen=True, kw_only=True)
class PriorTrainingConfig(TrainingConfig):
    """Settings of Stage I (:func:`train_dose_prior`); ``accumulate``: patients per step and process, one batch."""

    network: dict | None = None  # overrides of DEFAULT_PRIOR_CONFIG (the VQ-VAE's layers and codebook)
    run_name: str = "dose_prior"
    epochs: int = 30
    learning_rate: float = 1e-3


def train_dose_prior(spec: GridSpec, config: PriorTrainingConfig | None = None) -> Path:
    """Train (or resume) the dose prior on ``spec``'s grid; the path of the run's last checkpoint. Under
    ``torchrun`` every process trains on its share of each step's patients (see :mod:`doseai.train.distributed`);
    rank 0 validates, logs and checkpoints."""
    config = config or PriorTrainingConfig()
    rng, torch_device = start_run(config)
    epochs, norm_gy = config.epochs, config.norm_gy
    network = {**DEFAULT_PRIOR_CONFIG, **(config.network or {})}
    with main_process_first():  # rank 0 writes the model-grid cache, if missing
        train = load_split("train", spec, norm_gy, need_dose=True)
    validation = load_split("validation", spec, norm_gy, need_dose=True) if is_main_process() else None
    model = route_convolutions_to_onednn(build_dose_prior(network).to(torch_device))
    optimizer = torch.optim.Adam(model.parameters(), lr=step_learning_rate(config))
    checkpoints, log = open_run(config.run_name)
    start_epoch = checkpoints.resume(model, optimizer)
    example = torch.from_numpy(train.doses[:1].astype(np.float32)).to(torch_device)
    with local_codebooks(model):  # the timing forwards move the codebook (as they always did), alike everywhere
        use_bf16 = broadcast(choose_bf16(config, model, example, torch_device))  # one precision for every process
    step_model = wrap(model, torch_device)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, last_epoch=start_epoch - 1)
    if is_main_process():
        print(f"{len(train.ids)} training doses, {len(validation.ids)} validation doses, device {torch_device}, "
              f"bf16 {'on' if use_bf16 else 'off'}")
    for epoch in range(start_epoch, epochs):
        order = rng.permutation(len(train.ids))
        # every process draws for every patient, in order, so that a patient's draws are the single process's
        draws = [_draw_augmentation(rng) for _ in order]
        losses = []
        start = time.perf_counter()
        for positions in tqdm(step_positions(len(order), config.accumulate), desc=f"prior epoch {epoch + 1}/{epochs}",
                              unit="step", leave=False, disable=not is_main_process()):
            batch = np.concatenate([_apply_augmentation(train.doses[order[p]:order[p] + 1], draws[p])
                                    for p in positions])
            x = torch.from_numpy(batch.astype(np.float32)).to(torch_device)
            with autocast(torch_device, use_bf16):
                reconstruction, quantization_loss = step_model(x)
            loss = (reconstruction.float() - x).abs().mean() + quantization_loss.float().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        scheduler.step()
        losses = [loss for part in gather(losses) for loss in part]  # the epoch's loss over every process's steps
        if is_main_process():
            record = {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - start}
            if epoch % 5 == 4 or epoch == epochs - 1:
                record["val_mae_gy"] = reconstruction_mae_gy(model, validation.doses, torch_device, use_bf16, norm_gy)
            log.write(**record)
            print(json.dumps(record))
            checkpoints.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                              "config": network, "grid": {"shape_zyx": spec.shape, "spacing_xyz_mm": spec.spacing},
                              "norm_gy": norm_gy, "train_ids": train.ids, "val_mae_gy": record.get("val_mae_gy"),
                              **batch_record(config)})
    barrier()  # the last checkpoint is written before any process returns its path
    return checkpoints.path
