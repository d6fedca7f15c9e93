"""Dose calibration on the case grid: two corrections after the preference network, fitted on training plans.

The network's dose comes from a model grid (5 mm slices up to v2.2) and a coarse latent: it is smooth where a plan
is steep. Measured on the OpenKBP validation split (dose_preference_v2, neutral sliders), the highest PTV's D99
comes out 2.4 Gy low and the OARs' D0.1cc 1.3 Gy high, the same on training patients, and going to the grid and back
alone already costs the reference plan 1.3 Gy of D99. The corrections are monotonic in the dose, so a slider's
direction is kept:

  plan level     the mean dose in the targets of the highest prescription, over that prescription, is the plan's
                 level; the training plans keep it within a narrow range (2.5th-97.5th percentile 0.97-1.05), and
                 the network's level at neutral sliders does not follow the reference plan's on new patients (it
                 drifts far outside that range on anatomy unlike the training set's). A case whose network level
                 falls outside the range has every dose of the case scaled onto the nearest bound (one factor per
                 case, from the neutral sliders, so that the sliders move as before);
  target lift    in each target voxel, d += lift x max(0, level x Rx - d): the cold part of the target is moved
                 part of the way toward its prescription (Rx: the highest prescription covering the voxel; one
                 lift in the targets of the case's highest prescription, one in the others);
  OAR near-max   in each OpenKBP OAR, the voxels above its median dose (outside targets) are lowered by a ramp
                 from 0 at the median to oar_near_max x the highest prescription at its D0.1cc (at most half
                 the distance from the median to the D0.1cc, so that the voxels keep their order).

``fit_calibration`` (``doseai train calibrate-preference``) chooses the four numbers of the last two on training
patients, and ``plan_level_range`` takes the range from the training plans; the model card keeps them under
``calibration`` and ``DosePredictor`` applies them.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import asdict, dataclass, replace

import numpy as np

from doseai.case import PlanningCase
from doseai.dvh import upper_tail_ramp
from doseai.structures import OPENKBP_OARS

NEAR_MAX_CC = 0.1


@dataclass(frozen=True)
class DoseCalibration:
    target_lift: float = 0.0  # share of the gap to level x Rx closed in cold target voxels (0: off)
    target_level: float = 1.0  # relative to each voxel's prescription
    oar_near_max: float = 0.0  # OAR D0.1cc lowered by this x the highest prescription (0: off)
    # the lift in targets of a lower prescription than the case's highest (None: target_lift); their cold edge
    # borders both the higher target's spill and normal tissue, so it is fitted on its own
    lower_target_lift: float | None = None
    # (low, high) plan levels of the training plans (see the module text); None: off
    plan_level_range: tuple[float, float] | None = None

    @property
    def lift_below_top(self) -> float:
        return self.target_lift if self.lower_target_lift is None else self.lower_target_lift

    @classmethod
    def from_card(cls, card: dict) -> "DoseCalibration | None":
        entry = card.get("calibration")
        if not entry:
            return None
        lower, level_range = entry.get("lower_target_lift"), entry.get("plan_level_range")
        return cls(*(float(entry[key]) for key in ("target_lift", "target_level", "oar_near_max")),
                   None if lower is None else float(lower),
                   None if level_range is None else tuple(float(bound) for bound in level_range))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CaseRegions:
    """What the calibration needs of one case, computed once (``DosePredictor.set_case``): flat indices of the
    target voxels with their prescription, and of each OAR's voxels with a flag for those inside a target."""

    target_index: np.ndarray
    target_rx: np.ndarray
    target_is_top: np.ndarray  # covered by the highest prescription
    oar_index: dict[str, np.ndarray]
    oar_outside_targets: dict[str, np.ndarray]
    voxel_cc: float
    max_rx: float

    @classmethod
    def of(cls, case: PlanningCase) -> "CaseRegions":
        from doseai.models.features import target_dose_map

        rx = target_dose_map(case).ravel()
        target_index = np.flatnonzero(rx > 0)
        oar_index, outside = {}, {}
        for name in OPENKBP_OARS:
            mask = case.structures.get(name)
            if mask is not None and mask.any():
                oar_index[name] = np.flatnonzero(mask)
                outside[name] = rx[oar_index[name]] == 0
        top = rx[target_index] >= case.max_prescription - 1e-3
        return cls(target_index, rx[target_index], top, oar_index, outside,
                   case.geometry.voxel_volume_mm3 / 1000.0, case.max_prescription)


def _lower_near_max(flat: np.ndarray, regions: CaseRegions, amount_gy: float) -> None:
    for name, index in regions.oar_index.items():
        values = flat[index]
        tail = upper_tail_ramp(values, regions.voxel_cc, NEAR_MAX_CC)
        if tail is None:
            continue
        ramp, near_max, median = tail
        # at most half the tail's height: the ramp's slope stays >= 0.5, so the voxels keep their order
        lowered = min(amount_gy, 0.5 * (near_max - median))
        flat[index] = np.maximum(values - lowered * ramp * regions.oar_outside_targets[name], 0.0)


def plan_level(dose: np.ndarray, regions: CaseRegions) -> float:
    """Mean dose in the targets of the case's highest prescription, relative to that prescription."""
    top = regions.target_index[regions.target_is_top]
    return float(np.asarray(dose).ravel()[top].mean()) / regions.max_rx


def plan_levels_range(levels, percentiles=(2.5, 97.5)) -> tuple[float, float]:
    """The range of plan levels of training plans that ``plan_level_range`` keeps: their central 95 %."""
    low, high = np.percentile(np.asarray(levels, float), percentiles)
    return float(low), float(high)


def plan_level_scale(neutral_dose: np.ndarray, regions: CaseRegions, calibration: DoseCalibration) -> float:
    """The factor that brings the level of ``neutral_dose`` (the network's dose at neutral sliders) onto the
    calibration's plan level range; 1 inside it, without a range, or without dose in the targets."""
    if calibration.plan_level_range is None:
        return 1.0
    level = plan_level(neutral_dose, regions)
    if not level > 0:
        return 1.0
    low, high = calibration.plan_level_range
    return float(np.clip(level, low, high) / level)


def apply_calibration(dose: np.ndarray, regions: CaseRegions, calibration: DoseCalibration,
                      level_scale: float = 1.0) -> np.ndarray:
    """A calibrated copy of ``dose`` (Gy, case grid); ``level_scale``: the case's ``plan_level_scale``."""
    flat = np.array(dose, np.float32, copy=True).ravel()
    if level_scale != 1.0:
        flat *= np.float32(level_scale)
    if calibration.oar_near_max:
        _lower_near_max(flat, regions, calibration.oar_near_max * regions.max_rx)
    if calibration.target_lift or calibration.lift_below_top:
        values = flat[regions.target_index]
        gap = np.maximum(calibration.target_level * regions.target_rx - values, 0.0)
        lift = np.where(regions.target_is_top, calibration.target_lift, calibration.lift_below_top)
        flat[regions.target_index] = values + lift * gap
    return flat.reshape(np.shape(dose))


# The searched values. The plan level range is not searched: it is the training plans' own. The two corrections
# touch different voxels (targets / OARs outside targets), so they are fitted one after the other: the target lift
# (one for all targets, with its level), then the lift of the lower targets alone, then the OAR near-max with the
# lifts in place.
LIFT_GRID = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
LEVEL_GRID = (0.98, 1.0, 1.02, 1.04)
NEAR_MAX_GRID = (0.0, 0.01, 0.02, 0.03, 0.04)


def calibration_objective(cases, doses, regions, calibration: DoseCalibration,
                          reference_metrics=None) -> tuple[float, float]:
    """(OpenKBP dose score, DVH score) of the calibrated doses (at neutral sliders); their sum is what the fit
    minimises."""
    from doseai.scoring import Evaluation, score_patient

    evaluation = Evaluation()
    for index, (case, dose, region) in enumerate(zip(cases, doses, regions)):
        known = reference_metrics[index] if reference_metrics else None
        calibrated = apply_calibration(dose, region, calibration, plan_level_scale(dose, region, calibration))
        evaluation.patients.append(score_patient(case, calibrated, known))
    return evaluation.dose_score, evaluation.dvh_score


def fit_calibration(cases, doses, progress=None, plan_level_range: tuple[float, float] | None = None
                    ) -> tuple[DoseCalibration, dict]:
    """The calibration minimising dose score + DVH score of ``doses`` (predictions at neutral sliders) against
    ``cases`` (training patients with their plans), with ``plan_level_range`` (from ``plan_levels_range`` of the
    training plans) in place. Returns it with the scores before (the network alone) and after."""
    from doseai.scoring import openkbp_dvh_metrics

    regions = [CaseRegions.of(case) for case in cases]
    references = [openkbp_dvh_metrics(case.dose, case) for case in cases]

    @functools.lru_cache(maxsize=None)
    def total(calibration):
        scores = calibration_objective(cases, doses, regions, calibration, references)
        if progress:
            progress(calibration, scores)
        return sum(scores), scores

    before = total(DoseCalibration())[1]
    base = DoseCalibration(plan_level_range=plan_level_range)
    lifts = [replace(base, target_lift=lift, target_level=level)
             for lift, level in itertools.product(LIFT_GRID[1:], LEVEL_GRID)]
    best = min([base, *lifts], key=lambda c: total(c)[0])
    best = min((replace(best, lower_target_lift=lift) for lift in LIFT_GRID), key=lambda c: total(c)[0])
    best = min((replace(best, oar_near_max=near_max) for near_max in NEAR_MAX_GRID), key=lambda c: total(c)[0])
    after = total(best)[1]
    return best, {"patients": len(cases), "before": {"dose_score_gy": before[0], "dvh_score_gy": before[1]},
                  "after": {"dose_score_gy": after[0], "dvh_score_gy": after[1]}}
