"""What a prediction made (:class:`PredictionResult`), the request of a DVH edit, and how a prediction is
described: the model's OARs and sliders from its card, the calibration text of the dose node's provenance."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from doseai.mrml.plots import DVHResult


def model_oars(card: Mapping | None) -> list[str]:
    """The organ channels of a model card (what the model reads besides CT, targets, body, beams)."""
    from doseai.predict import model_oars as oars_of

    return oars_of(card)


def model_conditions(card: Mapping | None):
    """The sliders of a model card (:class:`doseai.conditions.ConditionSpace`), None without a card."""
    from doseai.conditions import ConditionSpace
    from doseai.errors import DoseAIError

    try:
        return ConditionSpace.from_card(card) if card else None
    except DoseAIError:
        return None


def slider_tooltips(card: Mapping | None) -> dict[str, str]:
    """Tooltip per slider of the card (``{"oar_sparing": ...}``), from its semantics text: the clauses about
    that slider, then the clauses about all, then its range; empty without a card."""
    conditions = model_conditions(card)
    return {c.name: c.tooltip for c in conditions} if conditions else {}


@dataclass
class PredictionResult:
    """What :meth:`DosePreferenceLogic.predict` (or :meth:`~DosePreferenceLogic.predictFromDVH`) made: the
    dose node, its DVH (chart, table, metrics), how long the prediction and the whole update took, the model
    structures the case lacks and what in the case the model may get wrong. A prediction from a desired DVH
    also has the desired DVH (model layout), the structures shown as edited and, for each, the mean distance
    between its predicted and desired curve (percent of the volume, over the model's dose levels)."""

    doseNode: object
    dvh: DVHResult
    predictSeconds: float
    totalSeconds: float
    missingStructures: list[str] = field(default_factory=list)
    desiredDVH: object = None
    editedStructures: list[str] | None = None
    dvhDistancePct: dict[str, float] = field(default_factory=dict)
    # per edited structure: achieved and desired mean dose and D0.1cc (Gy), see DVHDosePredictor.edit_report
    dvhEditReport: dict[str, dict[str, float]] = field(default_factory=dict)
    caseWarnings: list[str] = field(default_factory=list)  # the predictor's case_warnings: what it may get wrong
    spreadNode: object = None  # sampled doses (diffusion model): the volume of their 5-95 % band's width
    samples: int = 0  # how many doses were drawn (0: one dose, no sampling)

    def summary(self) -> str:
        text = f"Predicted in {self.predictSeconds:.2f} s"
        if self.samples:
            text += f" (mean of {self.samples} samples; their 5-95 % band in the spread volume and the DVH chart)"
        if self.editedStructures is not None:
            text += " from the desired DVH"
            if self.dvhEditReport:
                text += f" ({editReportText(self.dvhEditReport)})"
        text += f" (update {self.totalSeconds:.2f} s). {self.dvh.summary()}"
        if self.missingStructures:
            text += f". Not in the segmentation (empty model inputs): {', '.join(self.missingStructures)}"
        for note in self.caseWarnings:
            text += f". Warning: {note}"
        return text


def modelName(predictor) -> str:
    return str(predictor.card.get("name") or Path(predictor.weights).stem)


def calibrationText(predictor) -> str:
    """What ran after the slider network (doseai.calibration), for the dose node's provenance."""
    calibration = predictor.calibration if predictor.calibrated else None
    if calibration is None:
        return "none"
    text = (f"target lift {calibration.target_lift:g} (lower targets {calibration.lift_below_top:g}) toward "
            f"{calibration.target_level:g} x Rx, OAR near-max {calibration.oar_near_max:g} x Rx (model card)")
    scale = predictor.timings.get("plan_level_scale", 1.0)
    if scale != 1.0:
        low, high = calibration.plan_level_range
        text = (f"dose x {scale:.3f}: the network's plan level fell outside the training plans' "
                f"{low:.3f}-{high:.3f} x Rx; " + text)
    return text


def editReportText(report: Mapping[str, Mapping[str, float]]) -> str:
    """'Parotid_L mean 19.8 Gy (asked 19.2), D0.1cc 55.0 (asked 54.1)' per edited structure."""
    return "; ".join(f"{name} mean {row['mean_gy']:.1f} Gy (asked {row['desired_mean_gy']:.1f}), D0.1cc "
                     f"{row['d01cc_gy']:.1f} (asked {row['desired_d01cc_gy']:.1f})" for name, row in report.items())


@dataclass
class DVHRequest:
    """A prediction from a desired DVH, checked on the main thread: ``run`` is what the worker does."""

    predictor: object
    case: object
    vector: np.ndarray
    edited: list[str]
    startDose: np.ndarray  # the dose the edit changes (DVHDosePredictor.predict_edit)

    def run(self, start: float) -> tuple[np.ndarray, float, dict[str, float], dict[str, dict[str, float]]]:
        """The dose, the seconds since ``start``, per edited structure the mean distance (% volume) between the
        predicted DVH and the desired one, and its mean and D0.1cc against the desired curve's."""
        dose = self.predictor.predict_edit(self.startDose, self.vector)
        seconds = time.time() - start
        achieved = self.predictor.dvh_vector(dose)
        rows = {name: row for row, name in enumerate(self.predictor.structures)}
        distances = {name: float(100.0 * np.abs(achieved[rows[name]] - self.vector[rows[name]]).mean())
                     for name in self.edited}
        return dose, seconds, distances, self.predictor.edit_report(dose, self.vector, self.edited)
