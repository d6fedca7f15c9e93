"""Training of the DVH-conditioned network on generated Pareto plans (``doseai train pareto``).

Each step draws a training patient and a desired DVH near its Pareto front:
- 30 %: one of its plans' DVH vectors exactly;
- 30 %: a convex mix of two of its plans' DVH vectors (points between the sampled plans);
- 40 %: one plan's vector with one structure's curve stretched along the dose axis by 0.7-1.2 (an edit of a
  single curve, as a user makes in the editor).
The target is the **projection onto the Pareto set** (l1 between DVH vectors), in one of two forms:
- ``targets="plans"``: the patient's nearest plan (dose_dvh_v1);
- ``targets="mixes"`` (default): the nearest point on the segments between two of its plans,
  a x plan_i + (1 - a) x plan_j with a in steps of 0.1, its DVH taken as the same mix of the plans' DVH vectors
  (an approximation: the DVH of a mixed dose is not the mix of the DVHs). Dose is linear in the fluence, so the
  mixed dose is that of a deliverable plan (the mixed fluence). With 10 plans a patient's front is sparse:
  on the held-out patients, with the edited curve weighted 10x, the projection of "this OAR's curve at 80 % of
  its doses" leaves that OAR's mean dose unchanged in 68 % of the edits with plan targets and in 34 % with
  mixes (Testing/benchmarks/bench_dvh_edit.py reports this as "what the training targets ask"): a network
  trained on plan targets learns to ignore most edits.
For a single-curve edit the edited curve weighs ``EDIT_EMPHASIS`` times the others in that distance (with a
plain l1 the other nine curves outvote the edit). The loss is the voxel L1 in the body (+ 0.1 x everywhere) to
the target dose, with the frozen decoder's own output held to it too, as in the preference model, plus each
structure's mean and near-max (top 2 %) dose against the target's (the quantities the user reads off the DVH);
in a one-curve edit the edited structure's term may count more (``edit_metric_weight``): the shipped model moved
an edited OAR's mean by a median 21 % of what its target asked. With ``pair_weight`` > 0 each step also predicts
a reference plan of the same patient (the unedited plan of an edit) and penalises the gap between the change
of the two predictions and the change of their targets (:func:`difference_loss`): the error that anatomy alone
explains cancels in that difference, which leaves the response to the condition.
The network starts from the shipped preference weights (anatomy encoder, up path, refinement head, frozen
prior); only the FiLM input layers are new, zero-initialised so that training starts from the preference model
at neutral sliders. New Pareto patients that appear in the run folder join at the next epoch, so training can
start while plans are still being generated. Resumable from ``<cache>/runs/<name>/last.pt``.

With ``accumulate`` K (see :class:`~doseai.train.loop.TrainingConfig`) an optimizer step accumulates the
gradients of K samples (each its own forward and backward), clipped and applied once. Under ``torchrun`` each
process takes its share of a step's patients and DDP averages the gradients, so N processes train as one
process with ``accumulate`` N (up to rounding); a patient's draws (desired DVH, reference plan, mirror and shift)
are the single process's, every process drawing for every patient of the epoch in order. The patients of an
epoch are those rank 0 found (plans may appear while the processes look). Two things differ: a sample whose loss
is not finite is skipped with the other processes' samples of that micro-step (they must all take the same
branch), and the gradients are averaged across processes after every accumulated sample (so that a skipped
last one cannot leave them unsynchronised).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from doseai.models.dvh_conditioned import (DEFAULT_DVH_LAYOUT, DEFAULT_DVH_NET_CONFIG, MEAN_OFFSET_SIGMA_ZYX,
                                           build_dvh_net, load_matching_weights, structure_masks)
from doseai.errors import DoseAIError
from doseai.models.features import GridSpec, channel_names, mirror_order
from doseai.models.onednn import route_convolutions_to_onednn
from doseai.safe_load import load_state_dict_file
from doseai.paths import cache_root
from doseai.train.dataset import cache_folder, prepare_split
from doseai.train.distributed import (StepModule, all_processes, backward_share, barrier, broadcast, gather,
                                      is_main_process, main_process_first, step_positions, wrap)
from doseai.train.loop import TrainingConfig, batch_record, open_run, start_run, step_learning_rate

CHANNELS = channel_names()
BODY = CHANNELS.index("body")
MIRROR_ORDER = mirror_order(CHANNELS)
MIN_BODY_VOXELS = 1000
# Weight of the edited curve in the projection of a single-curve edit. Measured on the held-out Pareto sets
# (mix targets, "this OAR's curve at 80 % of its doses"): the target lowers that OAR in 66 % of the edits at 10,
# 89 % at 30, 98 % at 100, while PTV_70's mean dose moves by a median 0.4, 0.6, 0.8 % of Rx: 30 asks for the
# edit nearly always without trading the target away.
EDIT_EMPHASIS = 30.0
MEAN_DOSE_WEIGHT, NEAR_MAX_WEIGHT = 1.0, 0.5  # structure-metric loss terms (doses normalised by norm_gy)
NEAR_MAX_FRACTION = 0.02
OFFSET_LR_SCALE = 100.0  # MeanDoseOffset gains: ~0.04 per step at lr 4e-4, so they can reach ~1 in an epoch


def loss_text(edit_metric_weight: float = 1.0, pair_weight: float = 0.0, near_max_weight: float = NEAR_MAX_WEIGHT) -> str:
    """The training loss in words, for the checkpoint and the model card."""
    return (f"voxel L1 in the body (+0.1 x everywhere) and 0.5 x on the frozen decoder's output, + per structure "
            f"{MEAN_DOSE_WEIGHT} x |mean dose error| + {near_max_weight:g} x |near-max (top {NEAR_MAX_FRACTION:.0%}) "
            "dose error|, averaged over the structures (doses / norm_gy)"
            + (f"; in a one-curve edit the edited structure's term counts {edit_metric_weight:g}x"
               if edit_metric_weight != 1 else "")
            + (f"; each sample is paired with a plan of its patient (the unedited plan of an edit), the mean of both "
               f"losses + {pair_weight:g} x the difference loss (voxel L1 in the body of the change between the two "
               f"predictions against the change between their targets, + {MEAN_DOSE_WEIGHT} x |its mean| per "
               "structure)" if pair_weight > 0 else ""))


@dataclass
class ParetoPatient:
    """One training patient's model-grid inputs with its Pareto plans and their DVH vectors."""

    pid: str
    features: np.ndarray  # (C, z, y, x) float16
    doses: np.ndarray  # (plans, z, y, x) float16, normalised by norm_gy
    dvh: np.ndarray  # (plans, structures, points) float32


def load_pareto_patients(pareto_folder: Path, split: str, spec: GridSpec, norm_gy: float,
                         known: dict[str, ParetoPatient] | None = None) -> dict[str, ParetoPatient]:
    """The patients of ``pareto_folder`` (plans) joined with their cached model-grid inputs; ``known`` ones
    are kept, not reloaded."""
    patients = dict(known or {})
    features_folder = cache_folder(split, spec, norm_gy)
    if not features_folder.is_dir():
        prepare_split(split, spec, norm_gy)
    for path in sorted(Path(pareto_folder).glob("pt_*.npz")):
        pid = path.stem
        if pid in patients or path.name.endswith(".tmp.npz"):
            continue
        plans = np.load(path)
        features = np.load(features_folder / f"{pid}.npz")["features"]
        if np.count_nonzero(features[BODY] > 0.5) < MIN_BODY_VOXELS:
            # no body on the model grid (an empty possible-dose mask): the plans had no body term and the
            # voxel loss would be undefined
            print(f"{pid}: left out (empty body mask)")
            continue
        patients[pid] = ParetoPatient(pid, features, (plans["doses"].astype(np.float32) / norm_gy).astype(np.float16),
                                      plans["dvh_vectors"].astype(np.float32))
    return patients


def stretch_curve(curve: np.ndarray, factor: float) -> np.ndarray:
    """A cumulative DVH curve on evenly spaced doses, stretched along the dose axis: V'(d) = V(d / factor)."""
    points = np.arange(curve.size, dtype=np.float64)
    return np.interp(points / factor, points, curve, right=0.0).astype(np.float32)


def sample_desired_dvh(dvh: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """A desired DVH near the patient's Pareto front (see the module docstring), the per-curve weights of its
    projection (``EDIT_EMPHASIS`` on a single edited curve, 1 elsewhere) and the index of the plan it was
    drawn from (the unedited plan of an edit)."""
    weights = np.ones(dvh.shape[1], np.float32)
    kind = rng.random()
    start = int(rng.integers(len(dvh)))
    first = dvh[start]
    if kind < 0.3:
        return first.copy(), weights, start
    if kind < 0.6:
        weight = rng.random()
        return (weight * first + (1 - weight) * dvh[rng.integers(len(dvh))]).astype(np.float32), weights, start
    desired = first.copy()
    present = np.flatnonzero(desired[:, 0] > 0)
    row = rng.choice(present) if present.size else 0
    desired[row] = stretch_curve(desired[row], rng.uniform(0.7, 1.2))
    weights[row] = EDIT_EMPHASIS
    return desired, weights, start


def reference_plan(dvh: np.ndarray, desired: np.ndarray, start: int, rng: np.random.Generator) -> int:
    """The plan a sample is paired with in the difference loss: the plan it was drawn from, or another
    plan when the sample is that plan itself (the difference would be zero)."""
    if len(dvh) > 1 and np.array_equal(desired, dvh[start]):
        return int((start + rng.integers(1, len(dvh))) % len(dvh))
    return start


def nearest_plan(dvh: np.ndarray, desired: np.ndarray, curve_weights: np.ndarray | None = None) -> int:
    """Projection onto the Pareto set: the plan whose DVH vector is nearest to ``desired`` in (curve-weighted) l1."""
    distance = np.abs(dvh - desired[np.newaxis]).sum(axis=2)
    if curve_weights is not None:
        distance = distance * curve_weights[np.newaxis]
    return int(distance.sum(axis=1).argmin())


MIX_STEPS = np.linspace(0.0, 1.0, 11)


def nearest_mix(dvh: np.ndarray, desired: np.ndarray, curve_weights: np.ndarray | None = None
                ) -> tuple[int, int, float]:
    """Projection onto the segments between plans: ``(i, j, a)`` minimising the (curve-weighted) l1 between
    ``a x dvh[i] + (1 - a) x dvh[j]`` and ``desired``, ``a`` in steps of 0.1 (a = 1: plan i alone)."""
    weights = np.ones(dvh.shape[1], np.float32) if curve_weights is None else curve_weights
    first, second = np.triu_indices(len(dvh), k=1) if len(dvh) > 1 else (np.zeros(1, int), np.zeros(1, int))
    a = MIX_STEPS[:, np.newaxis, np.newaxis, np.newaxis]  # (steps, pairs, structures, points)
    mixes = a * dvh[first][np.newaxis] + (1 - a) * dvh[second][np.newaxis]
    distance = (np.abs(mixes - desired).sum(axis=3) * weights).sum(axis=2)  # (steps, pairs)
    step, pair = np.unravel_index(int(distance.argmin()), distance.shape)
    return int(first[pair]), int(second[pair]), float(MIX_STEPS[step])


def projection_target(patient: "ParetoPatient", desired: np.ndarray, curve_weights: np.ndarray,
                      targets: str = "mixes") -> np.ndarray:
    """The training target for ``desired``: the nearest plan's dose, or the nearest mix of two plans' doses
    (float32, normalised like the plans)."""
    if targets == "plans":
        return patient.doses[nearest_plan(patient.dvh, desired, curve_weights)].astype(np.float32)
    if targets != "mixes":
        raise ValueError(f"targets must be 'plans' or 'mixes', not {targets!r}")
    i, j, a = nearest_mix(patient.dvh, desired, curve_weights)
    return a * patient.doses[i].astype(np.float32) + (1 - a) * patient.doses[j].astype(np.float32)


def draw_mirror_shift(rng: np.random.Generator) -> tuple[bool, tuple[int, int, int]]:
    """The random part of :func:`augment`: (mirror, shift along z, y, x), drawn in its order."""
    mirror = bool(rng.random() < 0.5)
    return mirror, tuple(int(s) for s in rng.integers(-3, 4, size=3))


def augment(features: np.ndarray, dose: np.ndarray, desired: np.ndarray, curve_weights: np.ndarray,
            structures: list[str], rng: np.random.Generator):
    """Left-right mirror (parotid channels, DVH rows and their curve weights swapped) and small shifts;
    ``dose`` (k, z, y, x) and ``desired`` (structures, points) or (k, structures, points) may hold several."""
    return apply_mirror_shift(features, dose, desired, curve_weights, structures, *draw_mirror_shift(rng))


def apply_mirror_shift(features: np.ndarray, dose: np.ndarray, desired: np.ndarray, curve_weights: np.ndarray,
                       structures: list[str], mirror: bool, shift: tuple[int, int, int]):
    """:func:`augment` with its random part given (from :func:`draw_mirror_shift`)."""
    if mirror:
        features, dose = features[MIRROR_ORDER, ..., ::-1], dose[..., ::-1]  # fancy indexing copies
        rows = mirror_order(structures)
        desired, curve_weights = desired[..., rows, :], curve_weights[rows]  # one DVH vector or a stack of them
    return (np.roll(features, shift, axis=(-3, -2, -1)), np.roll(dose, shift, axis=(-3, -2, -1)), desired,
            curve_weights)


@dataclass(frozen=True)
class SampleDraw:
    """The random part of one training sample: the desired DVH, its projection's curve weights, the plan it was
    drawn from, the reference plan of the pair (None without ``pair_weight``), mirror and shift."""

    desired: np.ndarray
    curve_weights: np.ndarray
    drawn_from: int
    reference: int | None
    mirror: bool
    shift: tuple[int, int, int]


def draw_sample(dvh: np.ndarray, rng: np.random.Generator, paired: bool) -> SampleDraw:
    """Every draw of a sample of the patient with plans' DVH vectors ``dvh``, in the training step's order."""
    desired, curve_weights, drawn_from = sample_desired_dvh(dvh, rng)
    reference = reference_plan(dvh, desired, drawn_from, rng) if paired else None
    return SampleDraw(desired, curve_weights, drawn_from, reference, *draw_mirror_shift(rng))


def structure_metric_loss(prediction: torch.Tensor, y: torch.Tensor, masks: list[tuple[int, torch.Tensor]],
                          structure_weights: np.ndarray | None = None,
                          near_max_weight: float = NEAR_MAX_WEIGHT) -> torch.Tensor:
    """Sum over structures of weight x (|mean dose error| x MEAN_DOSE_WEIGHT + |near-max (top 2 %) error| x
    ``near_max_weight``), divided by the number of structures (weights 1: the mean)."""
    if not masks:
        return prediction.sum() * 0.0
    terms = []
    for index, mask in masks:
        predicted, target = prediction[0, 0][mask], y[0, 0][mask]
        k = max(2, int(NEAR_MAX_FRACTION * predicted.numel()))
        weight = 1.0 if structure_weights is None else float(structure_weights[index])
        terms.append(weight * (MEAN_DOSE_WEIGHT * (predicted.mean() - target.mean()).abs()
                               + near_max_weight * (predicted.topk(k).values.mean() - target.topk(k).values.mean()).abs()))
    return torch.stack(terms).sum() / len(terms)


def dose_loss(net, x: torch.Tensor, y: torch.Tensor, condition: torch.Tensor,
              masks: list[tuple[int, torch.Tensor]] | None = None,
              structure_weights: np.ndarray | None = None,
              features: list[torch.Tensor] | None = None,
              near_max_weight: float = NEAR_MAX_WEIGHT) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """(loss, its parts, the prediction); ``features``: ``net.encode_anatomy(x)`` when already computed."""
    latent = net.latent(net.encode_anatomy(x) if features is None else features, condition)
    coarse, prediction = net.decode_parts(latent, x, condition, masks=masks or [])
    body = x[:, BODY:BODY + 1] > 0.5
    error = (prediction - y).abs()
    voxel = error[body].mean() + 0.1 * error.mean()
    coarse_voxel = (coarse - y).abs()[body].mean()
    metrics = structure_metric_loss(prediction, y, masks or [], structure_weights, near_max_weight)
    return voxel + 0.5 * coarse_voxel + metrics, {"voxel": voxel.item(), "coarse": coarse_voxel.item(),
                                                  "structure_metrics": metrics.item()}, prediction


def difference_loss(predicted: torch.Tensor, target: torch.Tensor, body: torch.Tensor,
                    masks: list[tuple[int, torch.Tensor]], structure_weights: np.ndarray | None = None
                    ) -> torch.Tensor:
    """How far the change between two predictions for one anatomy is from the change between their targets:
    voxel L1 of (predicted - target) in the body, + per structure |mean of it| (weighted as in
    :func:`structure_metric_loss`, averaged). The anatomy's common error cancels in a difference, so this term
    sees only how the dose follows the condition, the signal a DVH edit needs."""
    gap = predicted - target
    terms = [(1.0 if structure_weights is None else float(structure_weights[index])) * gap[0, 0][mask].mean().abs()
             for index, mask in masks]
    structures = torch.stack(terms).sum() / len(terms) if terms else gap.sum() * 0.0
    return gap.abs()[body].mean() + MEAN_DOSE_WEIGHT * structures


def training_step_loss(net, x: torch.Tensor, y: torch.Tensor, conditions: torch.Tensor,
                       masks: list[tuple[int, torch.Tensor]], structure_weights: np.ndarray,
                       pair_weight: float, near_max_weight: float = NEAR_MAX_WEIGHT) -> tuple[torch.Tensor, dict]:
    """``y`` (k, 1, z, y, x) targets for the k ``conditions`` (k, condition size); the anatomy is encoded once.
    k = 1: :func:`dose_loss`. k = 2 (a sample and its reference plan): the mean of both dose losses +
    ``pair_weight`` x the :func:`difference_loss` of the two (the first counts ``structure_weights``)."""
    features = net.encode_anatomy(x)
    loss, parts, prediction = dose_loss(net, x, y[:1], conditions[:1], masks, structure_weights, features,
                                        near_max_weight)
    if len(conditions) == 1:
        return loss, parts
    reference_loss, reference_parts, reference = dose_loss(net, x, y[1:], conditions[1:], masks, None, features,
                                                           near_max_weight)
    pair = difference_loss(prediction - reference, y[:1] - y[1:], x[:, BODY:BODY + 1] > 0.5, masks,
                           structure_weights)
    parts = {key: 0.5 * (value + reference_parts[key]) for key, value in parts.items()}
    return 0.5 * (loss + reference_loss) + pair_weight * pair, {**parts, "difference": pair.item()}


@torch.no_grad()
def held_out_mae_gy(net, patients: dict[str, ParetoPatient], device, norm_gy: float, plans_per_patient: int = 3,
                    structures: list[str] | None = None) -> float:
    """Monitoring only (never trained on): body MAE between the prediction from a plan's own DVH and that plan."""
    net.eval()
    errors = []
    for patient in patients.values():
        x = torch.from_numpy(patient.features[np.newaxis].astype(np.float32)).to(device)
        features = net.encode_anatomy(x)
        masks = structure_masks(x, structures or list(DEFAULT_DVH_LAYOUT["structures"]), norm_gy)
        body = patient.features[BODY] > 0.5
        for plan in np.linspace(0, len(patient.dvh) - 1, plans_per_patient).round().astype(int):
            condition = torch.from_numpy(patient.dvh[plan].reshape(1, -1)).to(device)
            prediction = net.decode(net.latent(features, condition), x, condition, masks=masks)[0, 0].cpu().numpy()
            errors.append(np.abs(prediction - patient.doses[plan].astype(np.float32))[body].mean() * norm_gy)
    net.train()
    return float(np.mean(errors)) if errors else float("nan")


@dataclass(frozen=True, kw_only=True)
class DVHTrainingConfig(TrainingConfig):
    """Settings of the DVH-conditioned network's training (:func:`train_dvh`).

    ``targets``: the projection onto the Pareto set, "mixes" or "plans" (see the module docstring).
    ``edit_metric_weight``: how much the edited structure's structure-metric term counts in a one-curve edit
    (1: like the others, as in dose_dvh_v2). ``pair_weight`` > 0: every step also predicts the sample's
    reference plan (:func:`reference_plan`) and adds the :func:`difference_loss` of the two predictions
    (0: one prediction per step, as in dose_dvh_v2). ``mean_offset``: add the
    :class:`~doseai.models.dvh_conditioned.MeanDoseOffset` layer (its gains learn at ``OFFSET_LR_SCALE`` x the
    learning rate: 10 scalars that start at 0).
    """

    held_out_split: str = "validation"  # the Pareto patients the monitor runs on
    targets: str = "mixes"
    edit_metric_weight: float = 1.0
    pair_weight: float = 0.0
    mean_offset: bool = False
    near_max_weight: float = NEAR_MAX_WEIGHT
    run_name: str = "dvh"
    epochs: int = 20
    learning_rate: float = 5e-4


def train_dvh(spec: GridSpec, pareto_run: str, init_weights: Path, config: DVHTrainingConfig | None = None) -> Path:
    """Train (or resume) the DVH-conditioned network on ``spec``'s grid from the plans of Pareto run
    ``pareto_run``, starting from the preference weights ``init_weights``; the path of the run's last checkpoint.
    Under ``torchrun`` every process trains on its share of each step's patients (see the module docstring);
    rank 0 monitors, logs and checkpoints."""
    config = config or DVHTrainingConfig()
    rng, torch_device = start_run(config)
    epochs, learning_rate, norm_gy = config.epochs, step_learning_rate(config), config.norm_gy
    edit_metric_weight, pair_weight, near_max_weight = (config.edit_metric_weight, config.pair_weight,
                                                        config.near_max_weight)
    layout = dict(DEFAULT_DVH_LAYOUT)
    shipped = load_state_dict_file(init_weights)
    card = json.loads(Path(init_weights).with_suffix(".json").read_text())
    prior_config = card["dose_prior"]["config"]
    network = {**DEFAULT_DVH_NET_CONFIG,
               "mean_offset_sigma_zyx": list(MEAN_OFFSET_SIGMA_ZYX) if config.mean_offset else None}
    net = build_dvh_net(len(CHANNELS), prior_config, layout, network)
    fresh = load_matching_weights(net, shipped)
    net.freeze_prior()
    net = route_convolutions_to_onednn(net.to(torch_device))
    pareto_root = cache_root() / "pareto" / pareto_run
    trainable = [p for p in net.parameters() if p.requires_grad]
    gains = [p for name, p in net.named_parameters() if name.startswith("offset.")]
    groups = [{"params": [p for p in trainable if all(p is not g for g in gains)], "lr_scale": 1.0}]
    if gains:
        groups.append({"params": gains, "lr_scale": OFFSET_LR_SCALE, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, weight_decay=1e-4)
    checkpoints, log = open_run(config.run_name)
    start_epoch = checkpoints.resume(net, optimizer)
    held_out = (load_pareto_patients(pareto_root / config.held_out_split, config.held_out_split, spec, norm_gy)
                if is_main_process() else {})  # the monitor runs on rank 0
    if is_main_process():
        print(f"zero-initialised (new) layers: {fresh}; {len(held_out)} held-out patients; "
              f"device {torch_device}")
    # the mean-offset gains get no gradient for a patient without structures: DDP must look for unused ones
    step = wrap(StepModule(net, training_step_loss), torch_device, find_unused_parameters=net.offset is not None)
    patients: dict[str, ParetoPatient] = {}
    for epoch in range(start_epoch, epochs):
        with main_process_first():  # rank 0 may write the model-grid cache; the others then see its plans too
            patients = load_pareto_patients(pareto_root / "train", "train", spec, norm_gy, patients)
        ids = broadcast(list(patients))  # rank 0's patients: plans may appear between the processes' looks
        if not ids:
            raise FileNotFoundError(f"no Pareto plans under {pareto_root / 'train'}: run `doseai train pareto` first")
        for group in optimizer.param_groups:  # cosine decay per epoch (the number of steps grows with the data)
            group["lr"] = group["lr_scale"] * learning_rate * 0.5 * (1 + np.cos(np.pi * epoch / epochs))
        start = time.perf_counter()
        totals: dict[str, list[float]] = {}
        order = rng.permutation(len(ids))
        # every process draws for every patient, in order, so that a patient's draws are the single process's
        draws = [draw_sample(patients[ids[index]].dvh, rng, pair_weight > 0) for index in order]
        for positions in tqdm(step_positions(len(order), config.accumulate), desc=f"DVH epoch {epoch + 1}/{epochs}",
                              unit="step", leave=False, disable=not is_main_process()):
            optimizer.zero_grad(set_to_none=True)
            stepped = False
            for position in positions:
                patient, draw = patients[ids[order[position]]], draws[position]
                doses = [projection_target(patient, draw.desired, draw.curve_weights, config.targets)]
                conditions = [draw.desired]
                if draw.reference is not None:
                    doses.append(patient.doses[draw.reference].astype(np.float32))
                    conditions.append(patient.dvh[draw.reference])
                features, dose, desired, curve_weights = apply_mirror_shift(
                    patient.features, np.stack(doses), np.stack(conditions), draw.curve_weights, layout["structures"],
                    draw.mirror, draw.shift)
                x = torch.from_numpy(features[np.newaxis].astype(np.float32)).to(torch_device)
                y = torch.from_numpy(dose[:, np.newaxis].astype(np.float32)).to(torch_device)
                condition = torch.from_numpy(desired.reshape(len(desired), -1)).to(torch_device)
                loss, parts = step(x, y, condition, structure_masks(x, layout["structures"], norm_gy),
                                   np.where(curve_weights > 1, edit_metric_weight, 1.0), pair_weight, near_max_weight)
                # never let one bad sample move the weights (counted in the log); every process skips alike
                if not all_processes(bool(torch.isfinite(loss))):
                    totals.setdefault("skipped", []).append(1.0)
                    continue
                backward_share(loss, len(positions))
                stepped = True
                for key, value in parts.items():
                    totals.setdefault(key, []).append(value)
            if stepped:
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
        merged: dict[str, list[float]] = {}  # every process's samples, for the epoch's means
        for part in gather(totals):
            for key, values in part.items():
                merged.setdefault(key, []).extend(values)
        if is_main_process():
            record = {"epoch": epoch, "patients": len(ids), "seconds": time.perf_counter() - start,
                      **{key: float(np.sum(values) if key == "skipped" else np.mean(values))
                         for key, values in merged.items()},
                      "held_out_body_mae_gy": held_out_mae_gy(net, held_out, torch_device, norm_gy),
                      **({"offset_gains": [round(g, 3) for g in net.offset.gain.detach().tolist()]}
                         if net.offset is not None else {})}
            log.write(**record)
            print(json.dumps(record))
        checkpoints.save({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                          "config": network,
                          "layout": layout, "prior_config": prior_config, "init_weights": Path(init_weights).name,
                          "grid": {"shape_zyx": list(spec.shape), "spacing_xyz_mm": list(spec.spacing)},
                          "norm_gy": norm_gy, "channels": CHANNELS, "train_ids": ids, "pareto_run": pareto_run,
                          "loss": loss_text(edit_metric_weight, pair_weight, near_max_weight), "targets": config.targets,
                          "edit_emphasis": EDIT_EMPHASIS, **batch_record(config)})
    barrier()  # the last checkpoint is written before any process returns its path
    return checkpoints.path


def calibrate_near_max(weights: Path, pareto_run: str, limit: int = 10, every: int = 3) -> dict:
    """The constant by which the D0.1cc read off a plan's DVH vector exceeds the D0.1cc of the plan the network
    learns (its dose on the model grid, back on the case grid: the grid smooths the hottest 0.1 cc), measured on
    the first ``limit`` training patients of ``pareto_run`` (every ``every``-th plan), and written into the DVH
    model's card as ``near_max_matching``: the predictor then moves each structure's D0.1cc to the one its
    desired curve gives less this offset (:func:`doseai.dvh.match_near_max`). Training plans only."""
    from doseai.dvh import dose_at_volume_cc, dose_at_volume_cc_from_row
    from doseai.io import openkbp
    from doseai.models.features import model_geometry
    from doseai.paths import openkbp_root
    from doseai.resample import resample_to

    from doseai.predict import load_card
    from doseai.train.export import update_card

    card = load_card(Path(weights))
    layout, spec = card["dvh"], GridSpec.from_card(card)
    files = sorted((cache_root() / "pareto" / pareto_run / "train").glob("pt_*.npz"),
                   key=lambda path: int(path.stem.split("_")[1]))[:limit]
    if not files:
        raise DoseAIError(f"no training Pareto plans of run {pareto_run} in {cache_root() / 'pareto'}")
    cases = openkbp.list_patients(openkbp_root() / "train")
    offsets = []
    for path in files:
        case, plans = openkbp.load_npz(cases[path.stem]), np.load(path)
        grid, voxel_cc = model_geometry(case, spec), float(np.prod(case.geometry.spacing)) / 1000.0
        rx = case.max_prescription
        for dose, vector in zip(plans["doses"][::every], plans["dvh_vectors"][::every]):
            plan = resample_to(dose.astype(np.float32), grid, case.geometry)
            for row, name in enumerate(layout["structures"]):
                mask = case.structures.get(name)
                if mask is None or not mask.any():
                    continue
                read = dose_at_volume_cc_from_row(vector[row], 0.1, np.count_nonzero(mask) * voxel_cc,
                                                  layout["max_relative_dose"])
                offsets.append(read - dose_at_volume_cc(plan[mask], 0.1, voxel_cc) / rx)
    matching = {"offset_relative": float(np.mean(offsets)),
                "text": "after the network, each structure's D0.1cc is moved to the one its desired curve gives "
                        "(linear between the curve's points) less offset_relative x the highest prescription: the "
                        "difference is added to the structure's voxels above its median dose, ramped from 0 at the "
                        "median to 1 at the D0.1cc (doseai.dvh.match_near_max)",
                "calibration": f"offset measured on {len(files)} training patients of Pareto run {pareto_run}, one plan in "
                               f"{every}, {len(offsets)} structure plans (doseai train calibrate-dvh)"}
    update_card(weights, lambda card: card.update(near_max_matching=matching))
    return matching


EDIT_CALIBRATION_STRUCTURES = ("Parotid_L", "Parotid_R", "Larynx", "Mandible", "SpinalCord", "Esophagus", "Brainstem")
EDIT_GAIN_RANGE = (0.5, 1.5)


def one_curve_edit(predictor, unedited: np.ndarray, name: str, factor: float) -> tuple[np.ndarray, float]:
    """The desired DVH with ``name``'s curve of ``unedited`` (the start dose's DVH vector) moved to ``factor`` of
    its doses, and the mean-dose change it asks for (Gy, read off the two curves)."""
    from doseai.dvh import mean_from_row

    row = predictor.structures.index(name)
    desired = unedited.copy()
    desired[row] = stretch_curve(desired[row], factor)
    top = predictor.card["dvh"]["max_relative_dose"]
    asked = (mean_from_row(desired[row], top) - mean_from_row(unedited[row], top)) * predictor.norm_gy
    return desired, asked


def calibrate_edit_gain(weights: Path, limit: int = 15, factor: float = 0.8, threads: int | None = None) -> dict:
    """Per OAR, the gain on an edit's change (``DVHDosePredictor.predict_edit``) that makes the median edit
    achieve the mean-dose change it asks for, measured where the user starts: the shipped preference model's
    dose at neutral sliders, on the first ``limit`` training patients with a CT, each OAR's curve moved to
    ``factor`` of its doses. Written into the DVH model's card as ``edit_calibration``. Training patients only."""
    from doseai.io import openkbp
    from doseai.paths import openkbp_root
    from doseai.predict import DosePredictor, DVHDosePredictor
    from doseai.train.export import update_card

    preference, dvh = DosePredictor(threads=threads), DVHDosePredictor(Path(weights), threads=threads)
    dvh.edit_calibrated = False  # measure the network's own change
    shares: dict[str, list[float]] = {name: [] for name in EDIT_CALIBRATION_STRUCTURES}
    used = 0
    for pid, path in tqdm(list(openkbp.list_patients(openkbp_root() / "train").items()), desc="patients"):
        if used >= limit:
            break
        case = openkbp.load_patient(path)
        if case.ct is None:
            continue
        used += 1
        start = preference.predict_case(case)
        dvh.set_case(case)
        unedited = dvh.dvh_vector(start)
        for name in EDIT_CALIBRATION_STRUCTURES:
            mask = case.structures.get(name)
            if mask is None or not mask.any():
                continue
            desired, asked = one_curve_edit(dvh, unedited, name, factor)
            if abs(asked) < 0.01 * case.max_prescription:  # too small to measure
                continue
            edited = dvh.predict_edit(start, desired)
            shares[name].append(float(edited[mask].mean() - start[mask].mean()) / asked)
    low, high = EDIT_GAIN_RANGE
    gains = {name: float(np.clip(1.0 / np.median(values), low, high)) for name, values in shares.items() if values}
    calibration = {
        "gains": gains,
        "median_share_before": {name: float(np.median(values)) for name, values in shares.items() if values},
        "edits": {name: len(values) for name, values in shares.items()},
        "text": "an edit's change (the network's dose for the desired DVH less its dose for the start's DVH) is "
                "multiplied by the mean gain of the structures it moves, so that the median edit achieves the "
                f"mean-dose change it asks for (gains clipped to {low}-{high})",
        "calibration": f"{used} training patients with a CT, from {preference.card['name']} at neutral sliders, "
                       f"each OAR's curve moved to {factor:.0%} of its doses (doseai train calibrate-edit)",
    }
    update_card(weights, lambda card: card.update(edit_calibration=calibration))
    return calibration
