"""Stage II training: the anatomy encoder with FiLM sliders into the frozen dose prior's latent space.

Each step draws one training patient (with CT) and slider values: neutral (0, 0) in 40 % of steps,
one slider in [-1, 1] in 50 %, both in 10 %. At neutral the loss is the voxel L1 to the reference dose
(in the body) plus a latent match to the prior's encoding of that dose; otherwise it is the preference gap
(``preference_loss``) plus an L1 anchor to the reference where the slider should not act (inside the
PTVs for OAR sparing, outside them for homogeneity). The frozen decoder's own output is also held to the
reference at neutral, so the prior carries the dose and the refinement head only sharpens it. Resumable from ``<cache>/runs/<name>/last.pt``.

With ``accumulate`` K (see :class:`~doseai.train.loop.TrainingConfig`) an optimizer step accumulates the
gradients of K patients, each its own forward and backward (the loss is per patient: its slider draw picks the
branch), clipped and applied once. Under ``torchrun`` each process takes its share of a step's patients and
DDP averages the gradients, so N processes train as one process with ``accumulate`` N (the same weights on a
CPU; with ``accumulate`` > 1 in each process, up to the rounding of another summation order). The augmentation
and slider draws of a patient are those the single process makes for it: every process draws for every patient
of the epoch in order and uses the draws of its own. (The network decodes the prior's continuous latent, so the
prior's EMA codebook never moves here, trainable or not.)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Affine
from monai.utils import convert_to_tensor
from tqdm import tqdm

from doseai.errors import DoseAIError
from doseai.models.features import GridSpec, channel_names, mirror_order
from doseai.models.onednn import route_convolutions_to_onednn
from doseai.models.preference import DEFAULT_PREFERENCE_CONFIG, PreferenceDoseNet
from doseai.safe_load import load_checkpoint, load_state_dict_file
from doseai.train.dataset import load_split
from doseai.train.distributed import (StepModule, backward_share, barrier, broadcast, gather, gradient_sync,
                                      is_main_process, main_print, main_process_first, step_positions, wrap)
from doseai.train.loop import (TrainingConfig, autocast, batch_record, choose_bf16, open_run, start_run,
                               step_learning_rate)
from doseai.train.preference_loss import (
    DEFAULT_SEMANTICS,
    HOMOGENEITY,
    OAR_SPARING,
    PREFERENCE_CONDITIONS,
    dvh_metric_loss,
    plan_metrics,
    preference_gap,
)

CHANNELS = channel_names()
OAR_SLICE = slice(CHANNELS.index("Brainstem"), CHANNELS.index("Mandible") + 1)
TARGET = CHANNELS.index("target_dose")
BODY = CHANNELS.index("body")
MIRROR_ORDER = mirror_order(CHANNELS)
MAX_SHIFT_VOXELS = 3  # augmentation: shifts along each axis (the model card's account reads it)


@dataclass(frozen=True)
class AugmentationDraw:
    """The random part of :func:`augment`: mirror or not, the shift along z, y, x, and the turn (radians about z)
    and zoom factor, or None for no turn."""

    mirror: bool
    shift: tuple[int, int, int]
    turn: tuple[float, float] | None = None


def draw_augmentation(rng: np.random.Generator, rotate_deg: float = 0.0, scale: float = 0.0) -> AugmentationDraw:
    """What :func:`augment` draws from ``rng``, in the same order (so the run's random stream is unchanged)."""
    mirror = bool(rng.random() < 0.5)
    shift = tuple(int(s) for s in rng.integers(-MAX_SHIFT_VOXELS, MAX_SHIFT_VOXELS + 1, size=3))
    turn = None
    if (rotate_deg or scale) and rng.random() < 0.5:
        angle = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg))
        turn = (angle, float(1.0 + rng.uniform(-scale, scale)))
    return AugmentationDraw(mirror, shift, turn)


def augment(features: torch.Tensor, dose: torch.Tensor, rng: np.random.Generator, rotate_deg: float = 0.0,
            scale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-right mirror (swapping the parotid channels) and small shifts, applied to inputs and dose alike.
    Torch tensors, so that on a GPU the whole training set stays on the device. With ``rotate_deg`` or ``scale``,
    half the steps also turn the case about the z axis by up to that many degrees and zoom it by up to that
    fraction (MONAI's ``Affine``: linear, the prescription channel nearest): the beam plate turns with the
    anatomy, as the beams of a plan on the turned patient would, so the pair stays a plan."""
    return apply_augmentation(features, dose, draw_augmentation(rng, rotate_deg, scale))


def apply_augmentation(features: torch.Tensor, dose: torch.Tensor,
                       draw: AugmentationDraw) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`augment` with its random part given (from :func:`draw_augmentation`)."""
    if draw.mirror:
        features, dose = features.flip(-1)[:, MIRROR_ORDER], dose.flip(-1)
    shift = draw.shift
    features, dose = torch.roll(features, shift, dims=(-3, -2, -1)), torch.roll(dose, shift, dims=(-3, -2, -1))
    if draw.turn is not None:
        angle, zoom = draw.turn
        turn = Affine(rotate_params=(angle, 0.0, 0.0), scale_params=(zoom,) * 3,
                      mode="bilinear", padding_mode="border", image_only=True)
        both = convert_to_tensor(turn(torch.cat([features[0], dose[0]]).float()))  # no MONAI metadata
        # the prescription channel stays one level per target (the DVH-metric loss takes each level as a target)
        both[TARGET] = convert_to_tensor(turn(features[0, TARGET:TARGET + 1].float(), mode="nearest"))[0]
        features, dose = both[np.newaxis, :-1], both[np.newaxis, -1:]
    return features, dose


def sample_sliders(rng: np.random.Generator, neutral_fraction: float = 0.4) -> np.ndarray:
    """Neutral in ``neutral_fraction`` of the steps; of the rest, 5/12 move only OAR sparing, 5/12 only
    homogeneity, 1/6 both (0.25 / 0.25 / 0.1 at the v1 default of 0.4 neutral)."""
    sliders = np.zeros(len(PREFERENCE_CONDITIONS), np.float32)  # columns: PREFERENCE_CONDITIONS
    kind = rng.random()
    if kind < neutral_fraction:
        return sliders
    kind = (kind - neutral_fraction) / (1.0 - neutral_fraction)
    if kind < 5 / 12:
        sliders[OAR_SPARING] = rng.uniform(-1, 1)
    elif kind < 10 / 12:
        sliders[HOMOGENEITY] = rng.uniform(-1, 1)
    else:
        sliders[:] = rng.uniform(-1, 1, size=len(sliders))
    return sliders


def structure_masks(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(OAR masks, mask of the highest-prescription PTV, mask of all PTVs) from the input channels."""
    oars = features[:, OAR_SLICE] > 0.5
    target = features[:, TARGET:TARGET + 1]
    top = target.amax(dim=(2, 3, 4), keepdim=True)
    return oars, (target >= top - 1e-3) & (target > 0), target > 0


def step_loss(net: PreferenceDoseNet, x: torch.Tensor, y: torch.Tensor, sliders: torch.Tensor,
              semantics: dict, use_bf16: bool, device, latent_weight: float = 0.1,
              metric_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """``latent_weight`` 0 for the ablation without Stage I (no pretrained latent space to match);
    ``metric_weight`` weighs the DVH-metric loss (``dvh_metric_loss``) at neutral sliders (0 in v1)."""
    oars, top_ptv, ptvs = structure_masks(x)
    with autocast(device, use_bf16):
        features = net.encode_anatomy(x)
        latent = net.latent(features, sliders)
        coarse, prediction = net.decode_parts(latent, x, sliders)
        coarse, prediction = coarse.float(), prediction.float()
    reference_metrics = plan_metrics(y, oars, top_ptv)
    predicted_metrics = plan_metrics(prediction, oars, top_ptv)
    gap = preference_gap(predicted_metrics, reference_metrics, sliders, semantics)
    body = x[:, BODY:BODY + 1] > 0.5
    error = (prediction - y).abs()
    if not torch.any(sliders != 0):
        # the body holds 3-20 % of the grid: averaging over it (as the dose score does), not over the
        # whole grid, keeps the loss from being dominated by empty air
        voxel = error[body].mean() + 0.1 * error.mean()
        # The decoder's own output must already be the dose (the refinement head only sharpens it), and
        # the latent must sit where the prior put this dose: otherwise the refinement head learns the whole
        # task and the sliders, which act through the latent, lose their grip. The latent error is
        # relative to the target latent's power, so its weight does not depend on the codebook's scale.
        coarse_voxel = (coarse - y).abs()[body].mean()
        latent_error = torch.zeros((), device=y.device)
        if latent_weight:
            with torch.no_grad(), autocast(device, use_bf16):
                target_latent = net.prior.encode_stage_2_inputs(y).float()
            latent_error = (latent.float() - target_latent).pow(2).mean() / target_latent.pow(2).mean().clamp(min=1e-8)
        metrics = dvh_metric_loss(prediction, y, oars, x[:, TARGET:TARGET + 1]) if metric_weight else gap * 0.0
        loss = voxel + 0.5 * coarse_voxel + latent_weight * latent_error + 0.1 * gap + metric_weight * metrics
        return loss, {"voxel": voxel.item(), "coarse": coarse_voxel.item(), "latent": latent_error.item(),
                      "gap0": gap.item(), "dvh_metrics": metrics.item()}
    anchor_region = (ptvs if sliders[0, HOMOGENEITY] == 0 else
                     (~ptvs if sliders[0, OAR_SPARING] == 0 else torch.zeros_like(ptvs)))
    anchor_region = anchor_region & body
    anchor = (error * anchor_region).sum() / anchor_region.sum().clamp(min=1)
    loss = gap + 0.3 * anchor + 0.05 * error[body].mean()
    return loss, {"gap": gap.item()}


def loss_text(loss: dict | None) -> str:
    """The model card's account of ``step_loss`` for a checkpoint's ``loss`` record (None: before it was kept)."""
    if loss is None:
        return "not recorded in the checkpoint (v1 training: 40 % neutral steps, no DVH-metric loss)"
    return (f"{loss['neutral_fraction']:.0%} of the steps at neutral sliders: voxel L1 to the reference in the body "
            "(+0.1 x everywhere), 0.5 x on the frozen decoder's output, 0.1 x latent match, 0.1 x preference gap"
            + (f", {loss['metric_weight']:g} x DVH-metric loss (per structure: OAR mean and hottest 1 %, target "
               "coldest 5 %, hottest 1 % and mean)" if loss["metric_weight"] else "")
            + "; other steps: preference gap + 0.3 x L1 anchor where the slider should not act "
              "(doseai/train/train_preference.py)")


@torch.no_grad()
def validation_mae_gy(net, data, device, use_bf16, norm_gy, limit: int = 12) -> float:
    """Monitoring only (never used for training): dose MAE in the body on the model grid, neutral sliders."""
    net.eval()
    errors = []
    for features, dose in zip(data.features[:limit], data.doses[:limit]):
        x = torch.from_numpy(features[np.newaxis].astype(np.float32)).to(device)
        with autocast(device, use_bf16):
            prediction = net(x, torch.zeros(1, 2, device=device)).float().cpu().numpy()[0, 0]
        body = features[BODY] > 0.5
        errors.append(np.abs(prediction - dose[0].astype(np.float32))[body].mean() * norm_gy)
    net.train()
    return float(np.mean(errors))


def _epochs_within(budget_s: float, elapsed_s: float, epoch_s: float, epoch: int, epochs: int) -> int:
    """The epoch count (at most ``epochs``) whose run ends within ``budget_s``, ``elapsed_s`` having passed when
    epoch ``epoch`` (0-based) ended and each further epoch taking ``epoch_s`` (validation and checkpoint included)."""
    return min(epochs, epoch + 1 + max(0, int((budget_s - elapsed_s) // epoch_s)))


# epochs of a run after which a time budget sizes it: the first carries warm-up (cuDNN autotuning, the
# allocator; on a shared CPU whatever else ran), so the second's time sets the final count
BUDGET_SIZING_EPOCHS = 2


@dataclass(frozen=True, kw_only=True)
class PreferenceTrainingConfig(TrainingConfig):
    """Settings of Stage II (:func:`train_preference`).

    ``freeze_prior=False`` with a random prior gives the ablation without Stage I. ``init_weights`` (shipped
    weights) starts a new run from an earlier model, so training can go on across sessions. ``time_budget_s``:
    after the first and again after the second epoch, cut ``epochs`` to what fits in that many seconds (from the
    start of training) at that epoch's pace and fit the learning-rate schedule to it, so that a run on a lent GPU
    with a hard time limit still ends its schedule (the log records the epochs it chose). ``with_ct_less``: train
    on the training patients without a CT too (a water-equivalent body, as prediction uses for them): 27 more
    patients than the 169 with a CT. The monitor stays on validation patients with a CT. ``rotate_deg``,
    ``scale``: the turn and zoom augmentation of :func:`augment` (0: off, as up to v2.5).
    """

    run_name: str = "preference"
    epochs: int = 40
    learning_rate: float = 1e-3
    network: dict | None = None  # overrides of DEFAULT_PREFERENCE_CONFIG (e.g. {"refine_film": True})
    semantics: dict | None = None  # overrides of the sliders' DEFAULT_SEMANTICS
    freeze_prior: bool = True
    init_weights: Path | None = None
    neutral_fraction: float = 0.4  # share of the steps at neutral sliders
    metric_weight: float = 0.0  # weight of the DVH-metric loss
    time_budget_s: float | None = None
    with_ct_less: bool = False
    rotate_deg: float = 0.0
    scale: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 <= self.rotate_deg <= 90.0 and 0.0 <= self.scale < 0.5):
            raise DoseAIError(f"the turn must be within 0-90 deg and the zoom within 0-0.5, got {self.rotate_deg} "
                              f"and {self.scale}")


def train_preference(spec: GridSpec, prior_checkpoint: Path | None,
                     config: PreferenceTrainingConfig | None = None) -> Path:
    """Train (or resume) the preference model on ``spec``'s grid into the Stage I prior of ``prior_checkpoint``
    (None: a random prior, for the ablation); the path of the run's last checkpoint. Under ``torchrun`` every
    process trains on its share of each step's patients (see the module docstring); rank 0 validates, logs and
    checkpoints, and sizes the epochs to a time budget for all."""
    config = config or PreferenceTrainingConfig()
    rng, torch_device = start_run(config)
    norm_gy, freeze_prior = config.norm_gy, config.freeze_prior
    torch.backends.cudnn.benchmark = torch_device.type == "cuda"  # one input shape: autotuned kernels pay off
    semantics = {**DEFAULT_SEMANTICS, **(config.semantics or {})}
    network = {**DEFAULT_PREFERENCE_CONFIG, **(config.network or {})}
    prior_state = load_checkpoint(prior_checkpoint, ("model", "config"), "Stage I prior checkpoint") \
        if prior_checkpoint else None
    prior_config = prior_state["config"] if prior_state else None
    net = PreferenceDoseNet(len(CHANNELS), prior_config, network)
    if prior_state:
        net.prior.load_state_dict(prior_state["model"])
    if config.init_weights:  # parts the earlier model lacks (e.g. a new refine_film) keep their neutral initialisation
        shipped = load_state_dict_file(config.init_weights)
        missing, unexpected = net.load_state_dict({k: v.float() for k, v in shipped.items()}, strict=False)
        if unexpected or any(not key.startswith("refine_film.") for key in missing):
            raise ValueError(f"{config.init_weights} does not fit this network (missing {missing}, "
                             f"unexpected {unexpected})")
    if freeze_prior:
        net.freeze_prior()
    net = route_convolutions_to_onednn(net.to(torch_device))
    with main_process_first():  # rank 0 writes the model-grid cache, if missing
        train = load_split("train", spec, norm_gy, need_dose=True, need_ct=not config.with_ct_less)
    validation = load_split("validation", spec, norm_gy, need_dose=True, need_ct=True) if is_main_process() else None
    trainable = [p for p in net.parameters() if p.requires_grad]
    learning_rate = step_learning_rate(config)  # the schedule's peak
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=1e-4)
    checkpoints, log = open_run(config.run_name)
    start_epoch = checkpoints.resume(net, optimizer)
    steps_per_epoch = len(step_positions(len(train.ids), config.accumulate))  # the same on every process

    def one_cycle(total_epochs: int, steps_done: int):
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, pct_start=0.1,
                                                   total_steps=total_epochs * steps_per_epoch, last_epoch=steps_done - 1)

    epochs = config.epochs  # a time budget may cut it
    scheduler = one_cycle(epochs, start_epoch * steps_per_epoch)
    # float16 on the device (2.6 GB for 169 patients on a GPU), float32 one step at a time
    train_features = torch.from_numpy(train.features).to(torch_device)
    train_doses = torch.from_numpy(train.doses).to(torch_device)
    example = train_features[:1].float()
    use_bf16 = broadcast(choose_bf16(config, lambda x: net(x, torch.zeros(1, 2, device=torch_device)), example,
                                     torch_device))  # one precision for every process
    # the prior's encoder gets no gradient when it trains (the ablation): DDP must look for unused parameters
    step = wrap(StepModule(net, step_loss), torch_device, find_unused_parameters=not freeze_prior)
    main_print(f"{len(train.ids)} training patients ({int(np.sum(train.has_ct))} with CT), "
               f"{trainable and sum(p.numel() for p in trainable)} trainable parameters, device {torch_device}, "
               f"bf16 {'on' if use_bf16 else 'off'}")
    training_start = time.perf_counter()
    epoch, requested_epochs = start_epoch, epochs
    while epoch < epochs:
        start = time.perf_counter()
        totals: dict[str, list[float]] = {}
        order = rng.permutation(len(train.ids))
        # every process draws for every patient, in order, so that a patient's draws are the single process's
        draws = [(draw_augmentation(rng, config.rotate_deg, config.scale), sample_sliders(rng, config.neutral_fraction))
                 for _ in order]
        for positions in tqdm(step_positions(len(order), config.accumulate),
                              desc=f"preference epoch {epoch + 1}/{epochs}", unit="step", leave=False,
                              disable=not is_main_process()):
            optimizer.zero_grad(set_to_none=True)
            for n, position in enumerate(positions):
                index, (turn, slider_draw) = order[position], draws[position]
                features, dose = apply_augmentation(train_features[index:index + 1], train_doses[index:index + 1], turn)
                x, y = features.float(), dose.float()
                sliders = torch.from_numpy(slider_draw[np.newaxis]).to(torch_device)
                with gradient_sync(step, sync=n == len(positions) - 1):
                    loss, parts = step(x, y, sliders, semantics, use_bf16, torch_device,
                                       latent_weight=0.1 if freeze_prior else 0.0, metric_weight=config.metric_weight)
                    backward_share(loss, len(positions))
                for key, value in parts.items():
                    totals.setdefault(key, []).append(value)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
        merged: dict[str, list[float]] = {}  # every process's patients, for the epoch's means
        for part in gather(totals):
            for key, values in part.items():
                merged.setdefault(key, []).extend(values)
        if is_main_process():
            record = {"epoch": epoch, "epochs": epochs, "seconds": time.perf_counter() - start,
                      **{key: float(np.mean(values)) for key, values in merged.items()},
                      "val_body_mae_gy": validation_mae_gy(net, validation, torch_device, use_bf16, norm_gy)}
            log.write(**record)
            print(json.dumps(record))
        checkpoints.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                          "config": network, "prior_config": prior_config, "semantics": semantics,
                          "grid": {"shape_zyx": list(spec.shape), "spacing_xyz_mm": list(spec.spacing),
                                   "snap_to_case_lattice": spec.snap_to_case},
                          "norm_gy": norm_gy, "channels": CHANNELS, "train_ids": train.ids,
                          "freeze_prior": freeze_prior, "with_ct_less": config.with_ct_less,
                          "loss": {"neutral_fraction": config.neutral_fraction, "metric_weight": config.metric_weight},
                          "augmentation": {"rotate_deg": config.rotate_deg, "scale": config.scale},
                          **batch_record(config)})
        if config.time_budget_s and epoch - start_epoch < BUDGET_SIZING_EPOCHS:
            fitting = broadcast(_epochs_within(config.time_budget_s, time.perf_counter() - training_start,
                                               time.perf_counter() - start, epoch, requested_epochs))  # rank 0's pace
            if fitting != epochs:
                epochs = fitting
                if epoch + 1 < epochs:  # steps remain: the schedule ends with them
                    scheduler = one_cycle(epochs, (epoch + 1) * steps_per_epoch)
            main_print(f"time budget {config.time_budget_s:.0f} s: {epochs} epochs in all")
        epoch += 1
    barrier()  # the last checkpoint is written before any process returns its path
    return checkpoints.path
