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
from doseai.models.diffusion import (BODY, CHANNELS, OAR_CHANNELS, SITES, TARGET, ResidualDiffusionNet,
                                     coarse, condition_inputs, config_with_defaults, dose_gradient, fine,
                                     predicted_sample, schedulers)
from doseai.models.features import GridSpec, mirror_order
from doseai.paths import cache_root
from doseai.train.loop import TrainingConfig, gradient_step, open_run, start_run
from doseai.train.preference_loss import dvh_metric_loss

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
            gradient_step(optimizer, net.parameters(), loss)
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


FINE_DOSE_EDGES = [0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 1.05, 10.0]  # base dose / highest prescription
FINE_GRADIENT_BINS = 10  # quantile bins of the base dose gradient inside the patients' dose


def fit_fine_scale(folder: Path, spacing_zyx, pool_zyx, every: int = 2) -> dict:
    """The card's ``fine_scale`` table from the residual set in ``folder`` (every ``every``-th patient): the RMS of
    the fine part of the base's error (clinical - base - the upsampled coarse residual) by base dose level and
    gradient, over the voxels where the base or the clinical plan gives dose."""
    paths = sorted(folder.glob("pt_*.npz"))[::every]
    gradients, levels, fine_parts = [], [], []
    for path in tqdm(paths, desc="fine-scale error of the training patients", unit="patient"):
        d = np.load(path)
        base, clinical = d["base"].astype(np.float32), d["dose"].astype(np.float32)
        residual = torch.from_numpy(clinical - base)[None, None]
        fine_part = (residual - fine(coarse(residual, pool_zyx), residual.shape[2:]))[0, 0].numpy()
        where = (base > 0.01) | (clinical > 0)
        gradients.append(dose_gradient(base, spacing_zyx)[where])
        levels.append(base[where])
        fine_parts.append(fine_part[where])
    gradient, level, part = (np.concatenate(a) for a in (gradients, levels, fine_parts))
    # quantile edges (flat dose repeats the lowest, so they are made unique); the last one open-ended
    gradient_edges = np.unique(np.quantile(gradient, np.linspace(0, 1, FINE_GRADIENT_BINS + 1)))
    gradient_edges[0], gradient_edges[-1] = 0.0, float(gradient_edges[-1]) * 10
    n_gradient = len(gradient_edges) - 1
    g_bin = np.clip(np.searchsorted(gradient_edges, gradient, side="right") - 1, 0, n_gradient - 1)
    d_bin = np.clip(np.searchsorted(FINE_DOSE_EDGES, level, side="right") - 1, 0, len(FINE_DOSE_EDGES) - 2)
    squares = np.zeros((len(FINE_DOSE_EDGES) - 1, n_gradient))
    counts = np.zeros_like(squares)
    np.add.at(squares, (d_bin, g_bin), part.astype(np.float64) ** 2)
    np.add.at(counts, (d_bin, g_bin), 1)
    overall = float(np.sqrt(np.mean(part.astype(np.float64) ** 2)))
    row = np.sqrt(squares.sum(axis=1, keepdims=True) / np.maximum(counts.sum(axis=1, keepdims=True), 1))
    row = np.where(counts.sum(axis=1, keepdims=True) >= 100, row, overall)
    rms = np.where(counts >= 100, np.sqrt(squares / np.maximum(counts, 1)), row)  # a thin bin: its dose row's
    return {"gradient_edges": [float(e) for e in gradient_edges], "dose_edges": FINE_DOSE_EDGES,
            "rms": rms.round(5).tolist(), "patients": len(paths), "overall_rms": overall,
            "text": "RMS of the fine part of the base model's error on training patients (clinical - base - the "
                    "upsampled coarse residual), by base dose level (rows, relative to the highest prescription) "
                    "and base dose gradient (columns, relative dose per mm); the voxel-wise band adds it to the "
                    "samples' spread (doseai/diffusion_predict.py)"}


METRIC_KINDS = ("target D_99", "target D_95", "target D_1", "OAR mean", "OAR D_0.1_cc")


def _metric_values(dose: np.ndarray, oars: np.ndarray, levels: np.ndarray, voxel_cc: float) -> dict[str, list]:
    """The OpenKBP DVH metrics of a model-grid dose by kind (targets: each prescription level)."""
    from doseai.dvh import dose_at_volume_cc, dose_at_volume_pct

    values = {kind: [] for kind in METRIC_KINDS}
    for mask in oars:
        if mask.sum() >= 10:
            values["OAR mean"].append(float(dose[mask].mean()))
            values["OAR D_0.1_cc"].append(dose_at_volume_cc(dose[mask].astype(np.float64), 0.1, voxel_cc))
    for level in np.unique(levels[levels > 0]):
        inside = dose[levels == level].astype(np.float64)
        if inside.size >= 10:
            for kind, pct in (("target D_99", 99.0), ("target D_95", 95.0), ("target D_1", 1.0)):
                values[kind].append(dose_at_volume_pct(inside, pct))
    return values


def fit_metric_scale(folder: Path, spacing_zyx, pool_zyx, every: int = 2) -> dict:
    """Per DVH-metric kind, the RMS of what the coarse residual leaves of the base's metric error on training
    patients: metric(clinical) - metric(base + upsampled coarse residual), relative dose (the band of a
    sampled metric adds it to the samples' spread, as the voxel band adds the fine scale)."""
    voxel_cc = float(np.prod(spacing_zyx)) / 1000.0
    errors = {kind: [] for kind in METRIC_KINDS}
    for path in tqdm(sorted(folder.glob("pt_*.npz"))[::every], desc="DVH-metric error of the training patients",
                     unit="patient"):
        d = np.load(path)
        base, clinical = d["base"].astype(np.float32), d["dose"].astype(np.float32)
        shape = base.shape
        oars = np.unpackbits(d["oars"])[: len(OAR_CHANNELS) * base.size].reshape(len(OAR_CHANNELS), *shape) > 0
        levels = d["target"].astype(np.float32)
        residual = torch.from_numpy(clinical - base)[None, None]
        smooth = base + fine(coarse(residual, pool_zyx), shape)[0, 0].numpy()
        wanted, got = _metric_values(clinical, oars, levels, voxel_cc), _metric_values(smooth, oars, levels, voxel_cc)
        for kind in METRIC_KINDS:
            errors[kind].extend(np.subtract(wanted[kind], got[kind]).tolist())
    return {kind: float(np.sqrt(np.mean(np.square(values)))) if values else 0.0 for kind, values in errors.items()}


@torch.no_grad()
def fit_spread_scale(net: ResidualDiffusionNet, folder: Path, samples: int = 8, steps: int = 10, every: int = 10,
                     seed: int = 0) -> dict:
    """How much the sampled residuals' spread must be scaled about their mean to match the error of that mean on
    training patients (every ``every``-th): tau = sqrt(mean (true - mean)^2 / mean sample variance), over the
    body cells of the coarse grid. A diffusion model trained this briefly draws too narrow a spread; scaling the
    deviations about the mean keeps the mean (and its dose score) as it is."""
    from doseai.models.diffusion import sample_residuals

    net.eval()
    errors, variances = [], []
    generator = torch.Generator().manual_seed(seed)
    patients = load_residual_set(folder)[::every]
    for patient in tqdm(patients, desc="spread of the samples on training patients", unit="patient"):
        drawn = sample_residuals(net, patient.condition[None], patient.tokens[None], 0, samples, steps, generator)[:, 0]
        body = patient.condition[BODY] > 0.5
        mean = drawn.mean(dim=0)
        errors.append(((patient.residual[0] - mean)[body] ** 2).mean().item())
        variances.append(drawn.var(dim=0, unbiased=True)[body].mean().item())
    tau = float(np.sqrt(np.mean(errors) / max(np.mean(variances), 1e-12)))
    return {"spread_scale": tau, "patients": len(patients), "samples": samples, "steps": steps,
            "text": "the sampled residuals' deviations from their mean are multiplied by spread_scale, fitted on "
                    "training patients so that the samples' variance matches the squared error of their mean "
                    "(coarse grid, body cells)"}


def metric_band_fit(rows, coverage: float = 0.9) -> tuple[dict, dict, dict]:
    """From (kind, clinical, samples' mean, samples' variance, base) rows of training metrics: per kind the RMS of
    the mean's error beyond the samples' variance, the same for the base's, and the factor on 1.645 sd that makes
    a band mean +- factor x 1.645 x sqrt(variance + RMS^2) hold ``coverage`` of the rows (split-conformal style:
    the ``coverage`` quantile of |error| / sd)."""
    metric_rms, base_rms, factor = {}, {}, {}
    for kind in METRIC_KINDS:
        picked = [r for r in rows if r[0] == kind]
        if not picked:
            metric_rms[kind], base_rms[kind], factor[kind] = 0.0, 0.0, 1.0
            continue
        clinical, mean, variance, base = (np.array([r[i] for r in picked], np.float64) for i in range(1, 5))
        metric_rms[kind] = float(np.sqrt(max(0.0, np.mean((clinical - mean) ** 2) - variance.mean())))
        base_rms[kind] = float(np.sqrt(max(0.0, np.mean((clinical - base) ** 2) - variance.mean())))
        sd = np.sqrt(variance + metric_rms[kind] ** 2)
        scores = np.abs(clinical - mean) / np.maximum(sd, 1e-6)
        factor[kind] = float(max(1.0, np.quantile(scores, coverage) / 1.6449))
    return metric_rms, base_rms, factor


def calibrate_metric_bands(weights: Path, every: int = 5, samples: int = 8, threads: int | None = None) -> dict:
    """Refit the card's ``fine_scale.metric_rms`` where the user stands: on the case grid of training patients
    (every ``every``-th, through DiffusionDosePredictor as a prediction runs), per DVH-metric kind, what the
    samples' mean's squared metric error leaves beyond the samples' variance, and the band factor that holds 90 %
    of these metrics (:func:`metric_band_fit`). Written into the card."""
    from doseai.diffusion_predict import DiffusionDosePredictor
    from doseai.io import openkbp
    from doseai.paths import openkbp_root
    from doseai.scoring import metric_kind, openkbp_dvh_metrics
    from doseai.train.export import update_card

    predictor = DiffusionDosePredictor(weights, threads=threads)
    rows = []  # per metric: kind, clinical, the samples' mean, their variance, the base's (relative to Rx)
    patients = list(openkbp.list_patients(openkbp_root() / "train").items())[::every]
    used = 0
    for pid, path in tqdm(patients, desc="metric bands on training patients", unit="patient"):
        case = openkbp.load_npz(path)
        if case.dose is None:
            continue
        predictor.set_case(case)
        drawn = predictor.sample(samples, seed=used)
        norm = case.max_prescription
        per_sample = [openkbp_dvh_metrics(dose, case) for dose in drawn.doses]
        base = openkbp_dvh_metrics(predictor.base.predict(), case)
        for key, clinical in openkbp_dvh_metrics(case.dose, case).items():
            values = np.array([m[key] for m in per_sample]) / norm
            rows.append((metric_kind(key), clinical / norm, values.mean(),
                         values.var(ddof=1), base[key] / norm))
        used += 1
    metric_rms, base_rms, factor = metric_band_fit(rows)

    def record(card: dict) -> None:
        card["fine_scale"]["metric_rms"] = metric_rms
        card["fine_scale"]["metric_band_factor"] = factor
        card["fine_scale"]["metric_rms_of_the_base"] = base_rms
        card["fine_scale"]["metric_rms_text"] = (
            f"fitted on the case grid of {used} training patients ({samples} samples each), per DVH-metric kind "
            "(doseai.train.train_diffusion.calibrate_metric_bands): metric_rms, what the samples' mean's squared "
            "metric error leaves beyond the samples' variance, relative to the highest prescription; "
            "metric_band_factor, how much wider than the normal 5-95 % band (1.645 sd) a band must be to hold 90 % "
            "of these patients' metrics (at least 1); metric_rms_of_the_base, the same RMS for the base model's "
            "dose (were the mean's error smaller than the base's, the diffusion model would have memorised these "
            "patients)")
    update_card(Path(weights), record)
    return {"metric_rms": metric_rms, "metric_band_factor": factor}
