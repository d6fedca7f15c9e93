"""Training of the residual dose diffusion model (``doseai train diffusion``), see doseai/models/diffusion.py.

Two steps, both resumable:

1. :func:`prepare_residual_set` runs the shipped preference model (the *base*, frozen) once on every training
   patient at neutral sliders, averaged with its left-right mirror as the predictor does at neutral
   (``inference.mirror_neutral``), and keeps per patient (under ``<cache>/diffusion_set/<base>/train``): the
   coarse condition channels (anatomy and base dose pooled), the structure tokens, the coarse residual
   (clinical - base, relative dose), and at full model-grid resolution the base and clinical doses with the OAR
   and target masks (for the loss on clinical metrics).
2. :func:`train_diffusion`: v-prediction on the coarse residual (MSE) plus, with ``dvh_weight`` > 0, the
   conditional term: the clean residual the network implies, upsampled and added to the base dose, must give
   the clinical plan's DVH metrics (OAR mean and hottest 1 %, target coldest 5 %, hottest 1 % and mean:
   doseai.train.preference_loss.dvh_metric_loss), on the first patient of each batch whose noise level is
   below half the schedule (where the implied residual is already meaningful). ``dvh_weight`` 0 is the
   ablation. An exponential moving average of the weights is kept and shipped (diffusion samples from the
   averaged weights are smoother). Validation patients are never used.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from doseai.errors import DoseAIError
from doseai.models.diffusion import (SITES, ResidualDiffusionNet, coarse, config_with_defaults, fine,
                                     predicted_sample, schedulers, structure_tokens)
from doseai.models.features import GridSpec, channel_names, mirror_order
from doseai.paths import cache_root
from doseai.train.loop import TrainingConfig, open_run, start_run
from doseai.train.preference_loss import dvh_metric_loss

CHANNELS = channel_names()
OAR_CHANNELS = list(range(CHANNELS.index("Brainstem"), CHANNELS.index("Mandible") + 1))
TARGET, BODY, BEAMS = CHANNELS.index("target_dose"), CHANNELS.index("body"), CHANNELS.index("beam_plate")


def condition_inputs(anatomy: torch.Tensor, base_dose: torch.Tensor, pool_zyx) -> tuple[torch.Tensor, torch.Tensor]:
    """(coarse condition channels: the anatomy's and then the base dose's, structure tokens) of one batch."""
    condition = torch.cat([coarse(anatomy, pool_zyx), coarse(base_dose, pool_zyx)], dim=1)
    tokens = structure_tokens(anatomy, base_dose, OAR_CHANNELS, TARGET, BODY, BEAMS)
    return condition, tokens


def residual_set_folder(base_weights: Path, split: str = "train") -> Path:
    return cache_root() / "diffusion_set" / Path(base_weights).stem / split


@torch.no_grad()
def base_neutral_dose(net, x: torch.Tensor) -> torch.Tensor:
    """The base network's neutral dose, averaged with the dose of the mirrored anatomy (mirrored back)."""
    neutral = x.new_zeros((1, net.up[0].film.mlp[0].in_features))
    dose = net(x, neutral)
    mirrored = net(x.flip(-1)[:, mirror_order(CHANNELS)], neutral).flip(-1)
    return 0.5 * (dose + mirrored)


def prepare_residual_set(base_weights: Path, spec: GridSpec, pool_zyx, norm_gy: float = 70.0,
                         threads: int | None = None) -> Path:
    """Write (once per patient) the residual set of the training split; returns its folder."""
    from doseai.predict import DosePredictor
    from doseai.train.dataset import prepare_split

    if threads:
        torch.set_num_threads(threads)
    source = prepare_split("train", spec, norm_gy)
    folder = residual_set_folder(base_weights)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [p for p in sorted(source.glob("pt_*.npz")) if not (folder / p.name).is_file()]
    if not todo:
        return folder
    net = DosePredictor(base_weights, device="cpu").net
    for path in tqdm(todo, desc="base doses of the training patients", unit="patient"):
        data = np.load(path)
        if "dose" not in data.files:
            continue
        x = torch.from_numpy(data["features"].astype(np.float32))[None]
        base = base_neutral_dose(net, x)
        clinical = torch.from_numpy(data["dose"].astype(np.float32))[None, None]
        condition, tokens = condition_inputs(x, base, pool_zyx)
        arrays = {"condition": condition[0].numpy().astype(np.float16), "tokens": tokens[0].numpy(),
                  "residual": coarse(clinical - base, pool_zyx)[0].numpy(),
                  "base": base[0, 0].numpy().astype(np.float16), "dose": data["dose"],
                  "oars": np.packbits(data["features"][OAR_CHANNELS] > 0.5), "target": data["features"][TARGET],
                  "has_ct": data["has_ct"]}
        tmp = folder / f"{path.stem}.tmp.npz"
        np.savez(tmp, **arrays)
        tmp.rename(folder / path.name)
    return folder


@dataclass
class ResidualPatient:
    pid: str
    condition: torch.Tensor  # (C, coarse grid)
    tokens: torch.Tensor  # (T, F)
    residual: torch.Tensor  # (1, coarse grid), relative dose
    base: np.ndarray  # model grid, float16
    dose: np.ndarray
    oars: np.ndarray  # packed bits
    target: np.ndarray

    def full_resolution(self, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(base dose, clinical dose, OAR masks, target levels) as (1, ., z, y, x) tensors for the metric term."""
        n = len(OAR_CHANNELS)
        oars = np.unpackbits(self.oars)[: n * int(np.prod(shape))].reshape(n, *shape).astype(bool)
        as_tensor = lambda a: torch.from_numpy(np.asarray(a, np.float32))[None, None]  # noqa: E731
        return as_tensor(self.base), as_tensor(self.dose), torch.from_numpy(oars)[None], as_tensor(self.target)


def load_residual_set(folder: Path) -> list[ResidualPatient]:
    patients = []
    for path in sorted(folder.glob("pt_*.npz"), key=lambda p: int(p.stem.split("_")[1])):
        d = np.load(path)
        patients.append(ResidualPatient(path.stem, torch.from_numpy(d["condition"].astype(np.float32)),
                                        torch.from_numpy(d["tokens"]), torch.from_numpy(d["residual"]),
                                        d["base"], d["dose"], d["oars"], d["target"]))
    if not patients:
        raise DoseAIError(f"{folder}: no prepared patients (run prepare_residual_set first)")
    return patients


@dataclass(frozen=True, kw_only=True)
class DiffusionTrainingConfig(TrainingConfig):
    """``doseai train diffusion``: the base (preference) weights, network overrides, the batch of patients per
    step, the weight of the clinical-metric term (0: the ablation), the EMA decay and a time budget."""

    base_weights: str
    epochs: int = 60
    learning_rate: float = 2e-4
    batch: int = 4
    dvh_weight: float = 0.1
    ema_decay: float = 0.995
    minutes: float | None = None  # stop after the epoch that passes this budget (resume continues)
    network: dict = field(default_factory=dict)


def _ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), net.parameters()):
            e.lerp_(p, 1 - decay)


def _step(net, train_scheduler, batch: list[ResidualPatient], config: dict, dvh_weight: float, grid_shape,
          generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, dict]:
    x0 = torch.stack([p.residual for p in batch]).to(device) / config["residual_scale"]
    condition = torch.stack([p.condition for p in batch]).to(device)
    tokens = torch.stack([p.tokens for p in batch]).to(device)
    steps = train_scheduler.num_train_timesteps
    t = torch.randint(0, steps, (len(batch),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    t = t.to(device)
    noisy = train_scheduler.add_noise(x0, noise, t)
    target = train_scheduler.get_velocity(x0, noise, t) if config["prediction_type"] == "v_prediction" else noise
    site = torch.zeros(len(batch), dtype=torch.long, device=device)  # SITES[0]: head and neck, the only site of the data
    out = net(noisy, t, condition, tokens, site)
    mse = (out - target).pow(2).mean()
    record = {"mse": mse.item()}
    loss = mse
    low_noise = [i for i in range(len(batch)) if int(t[i]) < steps // 2]
    if dvh_weight and low_noise:
        i = low_noise[0]
        residual = predicted_sample(train_scheduler, out[i:i + 1], noisy[i:i + 1], t[i:i + 1]) * config["residual_scale"]
        base, clinical, oars, levels = (a.to(device) for a in batch[i].full_resolution(grid_shape))
        dose = torch.relu(base + fine(residual, grid_shape))
        metrics = dvh_metric_loss(dose, clinical, oars, levels)
        loss = loss + dvh_weight * metrics / config["residual_scale"]
        record["dvh_metrics"] = metrics.item()
    return loss, record


def train_diffusion(spec: GridSpec, config: DiffusionTrainingConfig, folder: Path | None = None) -> Path:
    """Train (resuming ``<cache>/runs/<run_name>``) on the residual set in ``folder`` (default: the training
    split's, prepared first if need be); returns the checkpoint path."""
    rng, device = start_run(config)
    network_config = config_with_defaults(config.network)
    if folder is None:
        folder = prepare_residual_set(Path(config.base_weights), spec, network_config["pool_zyx"], config.norm_gy,
                                      config.threads)
    patients = load_residual_set(folder)
    condition_channels = patients[0].condition.shape[0]
    net = ResidualDiffusionNet(condition_channels, network_config).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    checkpointer, log = open_run(config.run_name)
    start_epoch = 0
    state = checkpointer.load()
    if state:
        net.load_state_dict(state["model_raw"])
        ema.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
        rng = np.random.default_rng([config.seed, start_epoch])
    train_scheduler, _ = schedulers(network_config)
    generator = torch.Generator().manual_seed(config.seed * 1000 + start_epoch)
    began = time.time()
    for epoch in range(start_epoch, config.epochs):
        order = rng.permutation(len(patients))
        sums: dict[str, list[float]] = {}
        net.train()
        for first in tqdm(range(0, len(order), config.batch), desc=f"diffusion epoch {epoch + 1}", unit="step",
                          leave=False):
            batch = [patients[j] for j in order[first:first + config.batch]]
            loss, record = _step(net, train_scheduler, batch, network_config, config.dvh_weight, spec.shape, generator,
                                 device)
            if not torch.isfinite(loss):
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            _ema_update(ema, net, config.ema_decay)
            for key, value in record.items():
                sums.setdefault(key, []).append(value)
        means = {key: float(np.mean(values)) for key, values in sums.items()}
        checkpointer.save({"model": ema.state_dict(), "model_raw": net.state_dict(),
                           "optimizer": optimizer.state_dict(), "epoch": epoch, "config": network_config,
                           "condition_channels": condition_channels, "base_weights": Path(config.base_weights).name,
                           "train_ids": [p.pid for p in patients], "dvh_weight": config.dvh_weight,
                           "ema_decay": config.ema_decay, "batch_size": config.batch,
                           "learning_rate": config.learning_rate, "sites": list(SITES),
                           "grid": {"shape_zyx": list(spec.shape), "spacing_xyz_mm": list(spec.spacing)}})
        log.write(epoch=epoch, minutes=(time.time() - began) / 60, **means)
        print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()), flush=True)
        if config.minutes is not None and time.time() - began > 60 * config.minutes:
            break
    return checkpointer.path
