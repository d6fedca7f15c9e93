"""DosePredictor (sliders) and DVHDosePredictor (a desired DVH): shipped weights + model card -> a dose on
the case's own grid.

The model runs on a fixed grid (from its card). ``set_case`` resamples the case onto it and runs the
condition-independent half of the network once; ``predict`` then re-runs only the conditioned half
and resamples the dose back, so a slider change or a DVH edit costs a fraction of a full prediction.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from doseai.case import PlanningCase
from doseai.errors import DoseAIError, UnreadableInputError
from doseai.paths import REPO_ROOT

logger = logging.getLogger(__name__)

DEFAULT_MODEL = REPO_ROOT / "Resources" / "Models" / "dose_preference_v2_5.pt"
DEFAULT_DVH_MODEL = REPO_ROOT / "Resources" / "Models" / "dose_dvh_v3.pt"
DEFAULT_DIFFUSION_MODEL = REPO_ROOT / "Resources" / "Models" / "dose_diffusion_v1.pt"


def load_card(weights: Path) -> dict:
    """The model card (``<weights>.json``, written with the weights by ``doseai train export``)."""
    card_path = weights.with_suffix(".json")
    if not card_path.is_file():
        raise UnreadableInputError(f"{card_path}: model card missing: a weights file needs the card .json that was "
                                   "exported with it beside it, under the same name")
    try:
        card = json.loads(card_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnreadableInputError(f"{card_path}: not a model card: not valid JSON ({error})") from None
    if not isinstance(card, dict) or not isinstance(card.get("inputs"), dict):
        raise UnreadableInputError(f"{card_path}: not a model card: it has no 'inputs' section")
    return card


def model_oars(card: Mapping | None) -> list[str]:
    """The organ channels of a model card: what the model reads besides the CT, targets, body and beams."""
    from doseai.models.features import channel_names

    if not card:
        return []
    other = set(channel_names(oars=()))
    return [name for name in card["inputs"]["channels"] if name not in other]


def refinement_box(body: np.ndarray, source, channels: np.ndarray, grid):
    """The :class:`~doseai.models.preference.RefinementBox` of a case: the model-grid voxels that resampling the
    dose back onto the case grid ``source`` reads for the voxels of ``body`` (the corners of its bounding box,
    mapped into the model grid, one voxel out for the linear interpolation), and those where the anatomy
    ``channels`` (model grid) hold a target, an organ or the body, which the DVH model's offset layer reads."""
    from doseai.models.preference import RefinementBox

    hit = [np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(h.size == 0 for h in hit):
        return RefinementBox.around((0, 0, 0), grid.shape, grid.shape)
    corners = np.array(np.meshgrid(*[(h[0], h[-1]) for h in hit], indexing="ij")).reshape(3, -1).T
    kji = grid.physical_to_index(source.index_to_physical(corners.astype(float)))
    lower, upper = np.floor(kji.min(0)) - 1, np.ceil(kji.max(0)) + 1
    anatomy = np.argwhere(channels[1:-1].max(axis=0) > 0)  # target_dose, the organs, body
    if anatomy.size:
        lower, upper = np.minimum(lower, anatomy.min(0)), np.maximum(upper, anatomy.max(0))
    return RefinementBox.around(lower, upper, grid.shape)


@dataclass
class _Prepared:
    case: PlanningCase
    grid: object
    anatomy: object
    features: list
    body: np.ndarray
    norm_gy: float
    timings: dict = field(default_factory=dict)
    refinement_anatomy: object = None  # the refinement head's condition-free part (see PreferenceDoseNet)
    refinement_box: object = None  # doseai.models.preference.RefinementBox: where the refinement head runs
    decode_extras: dict = field(default_factory=dict)  # more per-case inputs of the network's decode
    calibration_regions: object = None  # doseai.calibration.CaseRegions, from the first calibrated dose on
    mirrored: "_Prepared | None" = None  # the left-right mirrored anatomy, from the first mirror-averaged dose on
    neutral_network_dose: dict = field(default_factory=dict)  # {network mode: network dose at neutral sliders}
    # mirror_neutral (model grid, once per case): the network's neutral dose, and half the mirror's difference to it
    neutral_model_grid: np.ndarray | None = None
    mirror_correction: np.ndarray | None = None


class _ModelPredictor:
    """Loads a network of the preference family with its card; ``set_case`` runs the condition-free down path
    once, ``_dose_for(condition)`` the conditioned half and the resampling back to the case grid."""

    default_weights = DEFAULT_MODEL

    def __init__(self, weights: str | Path | None = None, device: str = "auto", threads: int | None = None):
        import torch

        from doseai.models.features import GridSpec
        from doseai.models.onednn import route_convolutions_to_onednn
        from doseai.safe_load import load_into, load_state_dict_file
        from doseai.device import pick_device

        self.weights = Path(weights) if weights else self.default_weights
        if not self.weights.is_file():
            raise UnreadableInputError(f"{self.weights}: model weights not found (train them with `doseai train`)")
        if threads:
            torch.set_num_threads(threads)
        self.card = load_card(self.weights)
        # average the network's dose over the case and its left-right mirror (the training augments with
        # mirrors); the card says whether its calibration was fitted that way. Settable: False halves the time.
        inference = self.card.get("inference", {})
        self.mirror_average = bool(inference.get("mirror_average", False))
        # the same average at neutral sliders only, once per case, carried into every slider position as a
        # correction (see DosePredictor); settable, like mirror_average, which takes precedence
        self.mirror_neutral = bool(inference.get("mirror_neutral", False))
        self.spec = GridSpec.from_card(self.card)
        self.device = pick_device(device)
        try:
            self.net = self._build_net()
        except (KeyError, TypeError, ValueError) as error:
            raise UnreadableInputError(f"{self.weights.with_suffix('.json')}: not a model card of "
                                       f"{type(self).__name__}: cannot build its network ({error!r})") from None
        load_into(self.net, load_state_dict_file(self.weights), self.weights, self.card.get("name", "?"))
        self.net.freeze_prior()
        self.net.eval().to(self.device)
        route_convolutions_to_onednn(self.net)
        self._torch = torch
        self._prepared: _Prepared | None = None
        self.case_warnings: list[str] = []

    def _build_net(self):
        raise NotImplementedError

    def set_case(self, case: PlanningCase) -> None:
        """Prepare ``case``; ``case_warnings`` then lists what in it the model may get wrong (logged): structures
        unlike the training cases', targets outside the model's field."""
        from doseai.models.features import body_mask, case_features, ct_notes, outside_field, unlike_training

        case.require_target()
        start = time.perf_counter()
        norm_gy = case.max_prescription  # the network sees prescriptions relative to the highest one
        channels, grid = case_features(case, self.spec, norm_gy=norm_gy)
        prepared_at = time.perf_counter()
        self.case_warnings = ct_notes(case) + unlike_training(case, self.card) + outside_field(case, grid)
        for note in self.case_warnings:
            logger.warning("%s: %s", case.patient_id, note)
        body = body_mask(case)
        box = refinement_box(body, case.geometry, channels, grid)
        with self._torch.no_grad():
            x = self._torch.from_numpy(channels[np.newaxis]).to(self.device)
            features = self.net.encode_anatomy(x)
            refinement = self.net.refinement_anatomy_term(x, box) if self.net.refine is not None else None
        self._prepared = _Prepared(case, grid, x, features, body, norm_gy,
                                   {"features_s": prepared_at - start, "encoder_s": time.perf_counter() - prepared_at},
                                   refinement, refinement_box=box)

    def _require_case(self) -> _Prepared:
        if self._prepared is None:
            raise DoseAIError("call set_case(case) before predict()")
        return self._prepared

    def _mirrored(self, p: _Prepared, keep: bool = True) -> _Prepared:
        """The condition-free half of the network on the mirrored case, kept with ``p`` (once per case) unless
        ``keep`` is False: a single use need not hold its full-resolution tensors (~160 MB on the 2.5 mm grid)."""
        if p.mirrored is not None:
            return p.mirrored
        from doseai.models.features import mirror_order

        with self._torch.no_grad():
            x = p.anatomy.flip(-1)[:, mirror_order(self.card["inputs"]["channels"])]
            box = p.refinement_box.mirrored(x.shape[-1])
            refinement = self.net.refinement_anatomy_term(x, box) if self.net.refine is not None else None
            mirrored = _Prepared(p.case, p.grid, x, self.net.encode_anatomy(x), p.body, p.norm_gy,
                                 refinement_anatomy=refinement, refinement_box=box)
        if keep:
            p.mirrored = mirrored
        return mirrored

    def _network_dose(self, p: _Prepared, condition) -> np.ndarray:
        """The network's dose on the model grid (relative to the case's highest prescription)."""
        with self._torch.no_grad():
            latent = self.net.latent(p.features, condition)
            dose = self.net.decode(latent, p.anatomy, condition, p.refinement_anatomy, p.refinement_box,
                                   **p.decode_extras)
            return dose[0, 0].float().cpu().numpy()

    def _model_grid_dose(self, p: _Prepared, condition) -> np.ndarray:
        dose = self._network_dose(p, condition)
        if self.mirror_average:
            dose = 0.5 * (dose + self._network_dose(self._mirrored(p), condition)[..., ::-1])
        return dose

    @property
    def network_mode(self) -> str:
        """How the network's dose is formed: "mirror_average", "mirror_neutral" or "plain"."""
        if self.mirror_average:
            return "mirror_average"
        return "mirror_neutral" if self.mirror_neutral else "plain"

    def _dose_for(self, condition) -> np.ndarray:
        """Dose in Gy on the case grid (0 outside the body) for a (1, n) condition tensor."""
        from doseai.resample import resample_to

        p = self._require_case()
        start = time.perf_counter()
        p.timings.pop("mirror_correction_s", None)  # set again only by the call that computes it
        condition = condition.to(self.device)
        dose_model_grid = self._model_grid_dose(p, condition)
        network_at = time.perf_counter()
        dose = resample_to(dose_model_grid * p.norm_gy, p.grid, p.case.geometry)
        dose = np.clip(dose, 0.0, None) * p.body
        p.timings.update({"condition_network_s": network_at - start,
                          "resample_back_s": time.perf_counter() - network_at})
        return dose.astype(np.float32)

    @property
    def timings(self) -> dict:
        return dict(self._prepared.timings) if self._prepared else {}


class DosePredictor(_ModelPredictor):
    """Keeps the preference model loaded; ``set_case`` once per case, ``predict`` per slider position."""

    # the card's calibration (when it has one, see doseai.calibration) runs after the network; False: the
    # network's dose alone
    calibrated = True

    def _build_net(self):
        from doseai.models.preference import PreferenceDoseNet

        return PreferenceDoseNet(len(self.card["inputs"]["channels"]), self.card["dose_prior"]["config"],
                                 self.card["network"]["config"])

    @property
    def calibration(self):
        """The card's :class:`doseai.calibration.DoseCalibration`, or None."""
        from doseai.calibration import DoseCalibration

        return DoseCalibration.from_card(self.card)

    def calibrate(self, dose: np.ndarray) -> np.ndarray:
        """``dose`` (a network dose of the current case) after the card's calibration; as is without one."""
        from doseai.calibration import CaseRegions, apply_calibration, plan_level_scale

        p = self._require_case()
        calibration = self.calibration
        if calibration is None:
            return dose
        start = time.perf_counter()
        if p.calibration_regions is None:  # once per case
            p.calibration_regions = CaseRegions.of(p.case)
        scale = 1.0
        if calibration.plan_level_range is not None:  # one factor per case, from the neutral sliders
            scale = plan_level_scale(self._neutral_network_dose(p), p.calibration_regions, calibration)
        dose = apply_calibration(dose, p.calibration_regions, calibration, scale)
        p.timings["calibration_s"] = time.perf_counter() - start
        p.timings["plan_level_scale"] = scale
        return dose

    def _neutral_network_dose(self, p: _Prepared) -> np.ndarray:
        """The network's dose at neutral sliders (computed once per case unless a neutral prediction came first)."""
        if self.network_mode not in p.neutral_network_dose:
            requested = dict(p.timings)  # keep the timings of the dose asked for; this run has its own entry
            start = time.perf_counter()
            p.neutral_network_dose[self.network_mode] = self._dose_for(self._neutral_condition())
            p.timings.update(requested, neutral_for_plan_level_s=time.perf_counter() - start)
        return p.neutral_network_dose[self.network_mode]

    def _neutral_condition(self):
        space = self.conditions
        return self._torch.from_numpy(space.vector(space.values()))

    def _model_grid_dose(self, p: _Prepared, condition) -> np.ndarray:
        """With ``mirror_neutral`` (and not ``mirror_average``): once per case the network also runs at neutral
        sliders on the mirrored case; half the difference of that dose (mirrored back) to the case's own neutral
        dose is added to the dose at every slider position. The neutral dose is then the mirror average, and a
        slider change still runs the network once, its effect being the network's own."""
        if self.network_mode != "mirror_neutral":
            return super()._model_grid_dose(p, condition)
        if p.mirror_correction is None:
            start = time.perf_counter()
            neutral = self._neutral_condition().to(condition.device)
            p.neutral_model_grid = self._network_dose(p, neutral)
            mirrored = self._network_dose(self._mirrored(p, keep=False), neutral)[..., ::-1]  # used once
            p.mirror_correction = 0.5 * (mirrored - p.neutral_model_grid)
            p.timings["mirror_correction_s"] = time.perf_counter() - start  # part of this call's network time
        at_neutral = not bool(condition.any())
        return (p.neutral_model_grid if at_neutral else self._network_dose(p, condition)) + p.mirror_correction

    @property
    def conditions(self):
        """The model's :class:`~doseai.conditions.ConditionSpace`: the sliders' names, order, ranges, texts."""
        from doseai.conditions import ConditionSpace

        if self._conditions is None:
            self._conditions = ConditionSpace.from_card(self.card)
        return self._conditions

    _conditions = None

    @property
    def slider_range(self) -> tuple[float, float]:
        """The range of the first slider (every slider of the shipped models has the same)."""
        first = self.conditions.conditions[0]
        return first.low, first.high

    def predict(self, *values: float, sliders: Mapping[str, float] | None = None, **named: float) -> np.ndarray:
        """Dose in Gy on the case grid (0 outside the body) for the slider values: a mapping ``sliders``
        (``{"oar_sparing": 0.5}``), or values in the card's order (``predict(0.5, -0.2)``), or keywords
        (``predict(oar_sparing=0.5)``); a slider not given is neutral. DoseAIError for a name the model does
        not take or a value outside its range."""
        if values and sliders is not None:
            raise DoseAIError("give the slider values either in order or as a mapping, not both")
        space = self.conditions
        chosen = space.values(sliders if sliders is not None else (values or None), **named)
        dose = self._dose_for(self._torch.from_numpy(space.vector(chosen)))
        neutral_doses = self._prepared.neutral_network_dose  # what the case's plan level scale is measured on
        if space.is_neutral(chosen) and self.network_mode not in neutral_doses:
            neutral_doses[self.network_mode] = dose.copy()  # the caller may edit its own
        return self.calibrate(dose) if self.calibrated else dose

    def predict_case(self, case: PlanningCase, *values: float, sliders: Mapping[str, float] | None = None,
                     **named: float) -> np.ndarray:
        """:meth:`set_case` then :meth:`predict`."""
        self.set_case(case)
        return self.predict(*values, sliders=sliders, **named)


class DVHDosePredictor(_ModelPredictor):
    """Keeps the DVH-conditioned model loaded; ``set_case`` once per case, ``predict`` per desired DVH.

    A desired DVH is a (structures, points) array of volume fractions: each structure of ``structures`` at
    the doses ``dose_levels_gy()`` (see :func:`doseai.dvh.dvh_vector`). ``dvh_vector(dose)`` gives it for
    any dose of the current case, the natural starting point for an edit.
    """

    default_weights = DEFAULT_DVH_MODEL
    # the card's near-max matching (when it has one) runs after the network; False: the network's dose alone
    near_max_matching = True
    # predict_edit applies the card's edit_calibration gains; False: the network's change alone
    edit_calibrated = True
    _edit_start: tuple = (None, None)  # (case and start DVH, the network's dose for it): see predict_edit

    def _mirrored(self, p: _Prepared, keep: bool = True) -> _Prepared:
        raise DoseAIError(f"{self.weights.name}: the DVH model cannot average over the mirrored anatomy (its desired "
                          "DVH names left and right structures)")

    def _model_grid_dose(self, p: _Prepared, condition) -> np.ndarray:
        if self.network_mode == "mirror_neutral":  # DosePredictor's: neutral means its sliders at 0
            raise DoseAIError(f"{self.weights.name}: mirror_neutral needs neutral sliders (the preference model)")
        return super()._model_grid_dose(p, condition)

    def _build_net(self):
        from doseai.models.dvh_conditioned import build_dvh_net

        return build_dvh_net(len(self.card["inputs"]["channels"]), self.card["dose_prior"]["config"],
                             self.card["dvh"], self.card["network"]["config"])

    def set_case(self, case: PlanningCase) -> None:
        from doseai.models.dvh_conditioned import structure_masks

        super().set_case(case)
        p = self._prepared
        if self.net.offset is not None:  # the mean-offset layer's structures, once per case
            p.decode_extras = {"masks": structure_masks(p.anatomy, self.structures, p.norm_gy)}

    @property
    def structures(self) -> list[str]:
        return list(self.card["dvh"]["structures"])

    @property
    def norm_gy(self) -> float:
        """The dose the DVH vector's levels are relative to: the current case's highest prescription."""
        return self._require_case().norm_gy

    def dose_levels_gy(self) -> np.ndarray:
        layout = self.card["dvh"]
        return np.linspace(0.0, layout["max_relative_dose"] * self._require_case().norm_gy, layout["n_points"])

    def dvh_vector(self, dose: np.ndarray) -> np.ndarray:
        from doseai.dvh import dvh_vector

        p = self._require_case()
        layout = self.card["dvh"]
        return dvh_vector(dose, p.case.structures, self.structures, p.norm_gy, layout["n_points"],
                          layout["max_relative_dose"])

    def predict(self, desired_dvh: np.ndarray) -> np.ndarray:
        """Dose in Gy on the case grid (0 outside the body) whose DVH should follow ``desired_dvh``."""
        from doseai.models.dvh_conditioned import as_condition

        try:
            condition = as_condition(desired_dvh, self.card["dvh"])
        except ValueError as error:
            raise DoseAIError(str(error)) from error
        dose = self._dose_for(condition)
        matching = self.card.get("near_max_matching")
        if matching and self.near_max_matching:  # the network follows the curves' means, not their tops
            dose = self._match_near_max(dose, np.asarray(desired_dvh, np.float32), matching["offset_relative"])
        return dose

    def predict_edit(self, start_dose: np.ndarray, desired_dvh: np.ndarray) -> np.ndarray:
        """The dose the user started from (``start_dose``, e.g. the slider prediction, on the case grid) changed as
        the DVH edit asks: ``start + f(desired) - f(DVH of start)``, where f is the network (:meth:`predict`).

        The network has learned the engine's Pareto plans, not the dose the user edits, so its absolute dose
        carries that plan style; its *difference* between the desired DVH and the start's own DVH is the change
        the edit asks for. No edit is no change, by construction; an edit moves what the trade-off moves. The
        network's dose for the start's DVH is kept per case and start, so an edit costs one network run."""
        start_dose = np.asarray(start_dose, np.float32)
        p = self._require_case()
        if start_dose.shape != p.case.geometry.shape:
            raise DoseAIError(f"the dose the edit starts from has shape {start_dose.shape}, the case grid is "
                              f"{p.case.geometry.shape}")
        start_vector = self.dvh_vector(start_dose)
        key = (id(p), start_vector.tobytes())
        if self._edit_start[0] != key:
            self._edit_start = (key, self.predict(start_vector))
        network_start = self._edit_start[1]
        desired = np.asarray(desired_dvh, np.float32)
        if np.array_equal(desired, start_vector):
            return start_dose.copy()
        change = (self.predict(desired) - network_start) * self.edit_gain(start_vector, desired)
        return np.clip(start_dose + change, 0.0, None) * p.body

    def edit_gain(self, start_vector: np.ndarray, desired: np.ndarray) -> float:
        """The card's gain on an edit's change (``edit_calibration``, fitted on training patients by
        ``doseai train calibrate-edit`` so that an edit achieves what it asks, in the median): the mean gain
        of the structures whose curve the edit moved; 1 without a calibration or with ``edit_calibrated`` off."""
        gains = self.card.get("edit_calibration", {}).get("gains", {})
        if not gains or not self.edit_calibrated:
            return 1.0
        moved = [name for row, name in enumerate(self.structures)
                 if not np.allclose(desired[row], start_vector[row], atol=1e-6)]
        return float(np.mean([gains.get(name, 1.0) for name in moved])) if moved else 1.0

    def edit_report(self, dose: np.ndarray, desired_dvh: np.ndarray, names) -> dict[str, dict[str, float]]:
        """Per structure of ``names``: the achieved mean dose and D0.1cc of ``dose`` beside those the desired
        curve asks for (Gy), for honest feedback when a curve cannot be reached."""
        from doseai.dvh import dose_at_fraction_from_row, dose_at_volume_cc, mean_from_row

        p = self._require_case()
        voxel_cc = float(np.prod(p.case.geometry.spacing)) / 1000.0
        top = self.card["dvh"]["max_relative_dose"]
        report = {}
        for row, name in enumerate(self.structures):
            mask = p.case.structures.get(name)
            if name not in names or mask is None or not mask.any():
                continue
            curve = np.asarray(desired_dvh[row], np.float64)
            values = dose[mask]
            volume_cc = values.size * voxel_cc
            report[name] = {
                "mean_gy": float(values.mean()),
                "desired_mean_gy": mean_from_row(curve, top) * p.norm_gy,
                "d01cc_gy": dose_at_volume_cc(values, 0.1, voxel_cc),
                "desired_d01cc_gy": dose_at_fraction_from_row(curve, min(1.0, 0.1 / volume_cc), top) * p.norm_gy,
            }
        return report

    def _match_near_max(self, dose: np.ndarray, desired_dvh: np.ndarray, offset_relative: float) -> np.ndarray:
        from doseai.dvh import match_near_max

        p = self._require_case()
        voxel_cc = float(np.prod(p.case.geometry.spacing)) / 1000.0
        return match_near_max(dose, p.case.structures, self.structures, desired_dvh, p.norm_gy, voxel_cc,
                              offset_relative, self.card["dvh"]["max_relative_dose"])

    def desired_from_curves(self, curves, base_dose: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """A desired DVH from edited curves {structure: (dose_gy, volume_pct)} (e.g. ``read_dvh_csv``); the
        model's structures without a curve keep the DVH of ``base_dose`` (e.g. the slider prediction).
        Returns the vector and the structures taken from ``curves``."""
        from doseai.dvh import dvh_vector_from_curves

        vector, used = dvh_vector_from_curves(curves, self.structures, self.dose_levels_gy(),
                                              self.dvh_vector(base_dose))
        if not used:
            raise DoseAIError(f"none of the desired DVH's structures ({', '.join(curves)}) is one the model "
                              f"reads ({', '.join(self.structures)})")
        return vector, used

    def as_dvhs(self, vector: np.ndarray, names=None) -> dict:
        """The rows of a DVH vector as ``DVH`` curves of the current case (for plots and tables)."""
        from doseai.dvh import DVH

        p = self._require_case()
        voxel_cc = float(np.prod(p.case.geometry.spacing)) / 1000.0
        curves = {}
        for row, name in enumerate(self.structures):
            mask = p.case.structures.get(name)
            if (names is None or name in names) and mask is not None and mask.any():
                total = float(mask.sum()) * voxel_cc
                curves[name] = DVH(name, self.dose_levels_gy(), vector[row].astype(np.float64) * total, total)
        return curves
