"""OpenKBP dose score and DVH score, as defined in ``../shared/data/openkbp/README.md`` (and the
challenge's ``provided_code``), plus per-structure tables.

Dose score: per patient, sum |reference - prediction| over all voxels / number of possible-dose voxels;
averaged over patients. DVH score: mean absolute difference over every (patient, structure, metric)
present, both doses evaluated with the reference masks. OARs: D_0.1cc and mean; targets: D99, D95, D1.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

import numpy as np

from doseai.case import PlanningCase, validate_dose
from doseai.dvh import dose_at_volume_cc, dose_at_volume_pct
from doseai.errors import GeometryMismatchError, MissingStructureError
from doseai.structures import is_target

OAR_METRICS = ("D_0.1_cc", "mean")
TARGET_METRICS = ("D_99", "D_95", "D_1")


def metric_kind(key: tuple[str, str]) -> str:
    """The kind of an OpenKBP DVH metric key, ("PTV_70", "D_99") -> "target D_99", ("Larynx", "mean") -> "OAR mean"."""
    return f"{'target' if is_target(key[0]) else 'OAR'} {key[1]}"


def openkbp_dvh_metrics(dose: np.ndarray, case: PlanningCase) -> dict[tuple[str, str], float]:
    """The challenge's DVH metrics of ``dose`` for every non-empty structure of ``case`` (except External)."""
    voxel_cc = case.geometry.voxel_volume_mm3 / 1000.0
    metrics: dict[tuple[str, str], float] = {}
    for name, mask in case.structures.items():
        if name == "External" or not mask.any():
            continue
        values = np.asarray(dose, dtype=np.float64)[mask]
        if is_target(name):
            metrics[(name, "D_99")] = dose_at_volume_pct(values, 99.0)
            metrics[(name, "D_95")] = dose_at_volume_pct(values, 95.0)
            metrics[(name, "D_1")] = dose_at_volume_pct(values, 1.0)
        else:
            metrics[(name, "D_0.1_cc")] = dose_at_volume_cc(values, 0.1, voxel_cc)
            metrics[(name, "mean")] = float(values.mean())
    return metrics


@dataclass
class PatientScore:
    patient_id: str
    dose_score: float
    reference_metrics: dict[tuple[str, str], float]
    predicted_metrics: dict[tuple[str, str], float]

    @property
    def dvh_errors(self) -> dict[tuple[str, str], float]:
        return {key: abs(self.predicted_metrics[key] - value) for key, value in self.reference_metrics.items()}


def score_patient(reference: PlanningCase, prediction: np.ndarray,
                  reference_metrics: dict[tuple[str, str], float] | None = None) -> PatientScore:
    """Score one predicted dose against ``reference`` (which must hold a dose); ``reference_metrics``: its
    ``openkbp_dvh_metrics``, when already computed (scoring many predictions of one case)."""
    if reference.dose is None:
        raise MissingStructureError(f"reference case {reference.patient_id} has no dose to score against")
    prediction = validate_dose(prediction, f"predicted dose of {reference.patient_id}")
    if prediction.shape != reference.geometry.shape:
        raise GeometryMismatchError(
            f"{reference.patient_id}: predicted dose has shape {prediction.shape}, reference {reference.geometry.shape}"
        )
    possible = reference.possible_dose_mask
    n_possible = int(possible.sum()) if possible is not None else prediction.size
    dose_score = float(np.abs(reference.dose.astype(np.float64) - prediction).sum() / max(n_possible, 1))
    return PatientScore(
        patient_id=reference.patient_id,
        dose_score=dose_score,
        reference_metrics=reference_metrics or openkbp_dvh_metrics(reference.dose, reference),
        predicted_metrics=openkbp_dvh_metrics(prediction, reference),
    )


@dataclass
class Evaluation:
    """Scores over many patients: the challenge's two numbers and the tables behind them."""

    patients: list[PatientScore] = field(default_factory=list)

    @property
    def dose_score(self) -> float:
        return float(np.mean([p.dose_score for p in self.patients])) if self.patients else float("nan")

    @property
    def dvh_score(self) -> float:
        errors = [e for p in self.patients for e in p.dvh_errors.values()]
        return float(np.mean(errors)) if errors else float("nan")

    def per_structure(self) -> dict[tuple[str, str], dict[str, float]]:
        """Mean absolute error, mean signed error (predicted - reference) and count per (structure, metric)."""
        return self.errors_by(lambda structure, metric: (structure, metric))

    def errors_by(self, group: Callable[[str, str], Hashable]) -> dict:
        """Mean absolute error, mean signed error (predicted - reference) and count of the DVH metrics pooled by
        ``group(structure, metric)``."""
        groups: dict = {}
        for patient in self.patients:
            for key, reference in patient.reference_metrics.items():
                groups.setdefault(group(*key), []).append(patient.predicted_metrics[key] - reference)
        return {
            key: {"mae": float(np.mean(np.abs(d))), "bias": float(np.mean(d)), "n": len(d)}
            for key, d in sorted(groups.items())
        }

    def to_dict(self) -> dict:
        return {
            "n_patients": len(self.patients),
            "dose_score_gy": self.dose_score,
            "dvh_score_gy": self.dvh_score,
            "patients": {p.patient_id: {"dose_score_gy": p.dose_score,
                                        "dvh_mae_gy": float(np.mean(list(p.dvh_errors.values()) or [np.nan]))}
                         for p in self.patients},
            "per_structure": {f"{s}/{m}": v for (s, m), v in self.per_structure().items()},
        }


def evaluate(pairs: Iterable[tuple[PlanningCase, np.ndarray]]) -> Evaluation:
    """Score (reference case, predicted dose) pairs."""
    return Evaluation([score_patient(reference, prediction) for reference, prediction in pairs])


def naive_prediction(case: PlanningCase, elsewhere_gy: float = 25.0) -> np.ndarray:
    """The challenge's naive baseline: each PTV at its prescription (highest wins), ``elsewhere_gy``
    in the rest of the possible-dose mask, 0 outside."""
    possible = case.possible_dose_mask if case.possible_dose_mask is not None else np.ones(case.geometry.shape, bool)
    dose = np.where(possible, elsewhere_gy, 0.0).astype(np.float32)
    for name in sorted(case.prescriptions, key=case.prescriptions.get):
        dose[case.mask(name)] = case.prescriptions[name]
    return dose
