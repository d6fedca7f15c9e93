import numpy as np
import pytest

from doseai import GeometryMismatchError, ImageGeometry, PlanningCase
from doseai.scoring import evaluate, naive_prediction, openkbp_dvh_metrics, score_patient


def _toy_case():
    geometry = ImageGeometry(shape=(10, 10, 10), spacing=(4, 4, 2.5))  # 40 mm^3 voxels
    possible = np.zeros(geometry.shape, bool)
    possible[1:9, 1:9, 1:9] = True
    ptv = np.zeros(geometry.shape, bool)
    ptv[3:6, 3:6, 3:6] = True
    oar = np.zeros(geometry.shape, bool)
    oar[6:8, 6:8, 6:8] = True
    rng = np.random.default_rng(0)
    dose = np.where(possible, rng.uniform(10, 30, geometry.shape), 0).astype(np.float32)
    dose[ptv] = rng.uniform(66, 72, ptv.sum())
    return PlanningCase(geometry=geometry, structures={"PTV_70": ptv, "Brainstem": oar}, prescriptions={"PTV_70": 70.0},
                        dose=dose, possible_dose_mask=possible, patient_id="toy")


def test_dose_score_definition():
    case = _toy_case()
    prediction = case.dose + 2.0 * case.possible_dose_mask
    score = score_patient(case, prediction)
    assert score.dose_score == pytest.approx(2.0, rel=1e-6)
    # voxels outside the possible-dose mask count in the numerator, not the denominator
    prediction[0, 0, 0] = 512.0
    assert score_patient(case, prediction).dose_score == pytest.approx(2.0 + 512.0 / case.possible_dose_mask.sum())


def test_dvh_metrics_follow_openkbp():
    case = _toy_case()
    metrics = openkbp_dvh_metrics(case.dose, case)
    ptv_values = case.dose[case.structures["PTV_70"]]
    oar_values = case.dose[case.structures["Brainstem"]]
    assert metrics[("PTV_70", "D_99")] == pytest.approx(np.percentile(ptv_values, 1))
    assert metrics[("PTV_70", "D_95")] == pytest.approx(np.percentile(ptv_values, 5))
    assert metrics[("PTV_70", "D_1")] == pytest.approx(np.percentile(ptv_values, 99))
    # 0.1 cc = 100 mm^3 over 40 mm^3 voxels -> n = round(2.5) = 2 voxels of the 8
    assert metrics[("Brainstem", "D_0.1_cc")] == pytest.approx(np.percentile(oar_values, 100 - 100 * 2 / 8))
    assert metrics[("Brainstem", "mean")] == pytest.approx(oar_values.mean())
    assert set(metrics) == {("PTV_70", "D_99"), ("PTV_70", "D_95"), ("PTV_70", "D_1"),
                            ("Brainstem", "D_0.1_cc"), ("Brainstem", "mean")}


def test_perfect_prediction_scores_zero_and_naive_is_worse():
    case = _toy_case()
    perfect = evaluate([(case, case.dose)])
    assert perfect.dose_score == 0 and perfect.dvh_score == 0
    naive = naive_prediction(case)
    assert np.all(naive[case.structures["PTV_70"]] == 70) and np.all(naive[~case.possible_dose_mask] == 0)
    result = evaluate([(case, naive)])
    assert result.dose_score > 1 and result.dvh_score > 0.5
    table = result.per_structure()
    assert table[("PTV_70", "D_95")]["n"] == 1


def test_shape_mismatch_is_reported():
    case = _toy_case()
    with pytest.raises(GeometryMismatchError):
        score_patient(case, np.zeros((10, 10, 9)))
