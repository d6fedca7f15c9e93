import numpy as np
import pytest

from doseai.cli import main
from doseai.geometry import ImageGeometry
from doseai.io import load_case, load_dose, openkbp
from doseai.case import PlanningCase
from doseai.scoring import naive_prediction


def test_axis_order_roundtrip_and_orientation():
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # OpenKBP [ap, rl, si]
    itk = openkbp.to_itk_order(a)
    assert itk.shape == (4, 2, 3)
    assert np.array_equal(openkbp.from_itk_order(itk), a)
    # the most superior OpenKBP slice (si = 0) is the last z index (z runs inferior -> superior)
    assert np.array_equal(itk[-1], a[:, :, 0])


def _synthetic_openkbp_case():
    geometry = ImageGeometry(shape=openkbp.OPENKBP_SHAPE, spacing=(3.5, 4.0, 2.5))
    possible = np.zeros(geometry.shape, bool)
    possible[40:80, 30:90, 30:100] = True
    ptv = np.zeros(geometry.shape, bool)
    ptv[50:60, 50:60, 50:60] = True
    cord = np.zeros(geometry.shape, bool)
    cord[40:80, 85:88, 60:63] = True
    dose = np.where(possible, 20.0, 0.0).astype(np.float32)
    dose[ptv] = 70.25
    return PlanningCase(geometry=geometry, structures={"PTV_70": ptv, "SpinalCord": cord}, prescriptions={"PTV_70": 70},
                        dose=dose, possible_dose_mask=possible, patient_id="pt_9")


@pytest.mark.parametrize("fmt", ["openkbp-npz", "openkbp-csv"])
def test_openkbp_formats_roundtrip(tmp_path, fmt):
    from doseai.io import save_case

    case = _synthetic_openkbp_case()
    path = save_case(case, tmp_path / "pt_9", fmt)
    back = load_case(path)
    assert back.geometry.matches(case.geometry)
    assert set(back.structures) == {"PTV_70", "SpinalCord"} and back.prescriptions == {"PTV_70": 70.0}
    for name in case.structures:
        assert np.array_equal(back.structures[name], case.structures[name])
    assert np.array_equal(back.possible_dose_mask, case.possible_dose_mask)
    assert np.abs(back.dose - case.dose).max() <= 0.005


def test_real_patient_npz_and_csv_agree(openkbp_validation, tmp_path):
    case = openkbp.load_npz(openkbp_validation / "pt_201.npz")
    assert case.geometry.shape == (128, 128, 128) and case.dose is not None
    assert case.prescriptions["PTV_70"] == 70.0
    assert not (case.dose[~case.possible_dose_mask] > 0).any()  # as the data README states
    # orientation: brainstem above the cord, left parotid on the patient's left (+x in LPS)
    z = lambda name: np.argwhere(case.structures[name])[:, 0].mean()  # noqa: E731
    assert z("Brainstem") > z("SpinalCord")
    if {"Parotid_L", "Parotid_R"} <= set(case.structures):
        x = lambda name: np.argwhere(case.structures[name])[:, 2].mean()  # noqa: E731
        assert x("Parotid_L") > x("Parotid_R")
    folder = openkbp.save_csv_patient(case, tmp_path / "pt_201")
    back = openkbp.load_csv_patient(folder)
    assert np.abs(back.dose - case.dose).max() < 1e-4
    assert all(np.array_equal(back.structures[n], m) for n, m in case.structures.items())
    assert np.allclose(back.geometry.spacing, case.geometry.spacing)


def test_naive_prediction_reproduces_published_scores(openkbp_validation, tmp_path, capsys):
    """The data README: the naive prediction scores about 16.0 Gy (dose) and 6.6 Gy (DVH) on validation."""
    predictions = tmp_path / "naive"
    for pid, path in openkbp.list_patients(openkbp_validation).items():
        openkbp.save_npz_dose(naive_prediction(openkbp.load_npz(path)), predictions / f"{pid}.npz")
    report = tmp_path / "naive.json"
    assert main(["evaluate", "--reference", str(openkbp_validation), "--predictions", str(predictions),
                 "--json", str(report)]) == 0
    import json

    result = json.loads(report.read_text())
    assert result["n_patients"] == 40
    assert result["dose_score_gy"] == pytest.approx(16.0, abs=0.1)
    assert result["dvh_score_gy"] == pytest.approx(6.6, abs=0.1)
    assert "dose score: 16.0" in capsys.readouterr().out


def test_reference_against_itself_scores_zero(openkbp_validation, tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    predictions = tmp_path / "predictions"
    for pid in ("pt_201", "pt_202", "pt_203"):
        (reference / f"{pid}.npz").symlink_to(openkbp_validation / f"{pid}.npz")
        case = openkbp.load_npz(openkbp_validation / f"{pid}.npz")
        openkbp.save_npz_dose(case.dose, predictions / f"{pid}.npz")
        assert np.array_equal(load_dose(predictions / f"{pid}.npz", case), case.dose)
    report = tmp_path / "self.json"
    assert main(["evaluate", "--reference", str(reference), "--predictions", str(predictions), "--json", str(report)]) == 0
    import json

    result = json.loads(report.read_text())
    assert result["dose_score_gy"] == 0.0 and result["dvh_score_gy"] == 0.0
