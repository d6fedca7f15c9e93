"""The doseai command line: outputs, one-line errors with non-zero exit codes, no silent overwrite."""

import numpy as np
import pytest

from doseai.cli import main
from doseai.io import images, save_case


@pytest.fixture()
def nrrd_case(small_case, tmp_path):
    return save_case(small_case, tmp_path / "case", "nrrd")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_dvh_report(nrrd_case, tmp_path, capsys, small_case):
    out = tmp_path / "report"
    assert main(["dvh", "--case", str(nrrd_case), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PTV_70" in printed and "Dmean" in printed
    header = (out / "dvh.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "dose_gy" and "PTV_70_volume_pct" in header
    rows = (out / "metrics.csv").read_text().splitlines()
    ptv_row = next(r for r in rows if r.startswith("PTV_70,"))
    columns = rows[0].split(",")
    dmean = float(ptv_row.split(",")[columns.index("Dmean")])
    assert dmean == pytest.approx(small_case.dose[small_case.structures["PTV_70"]].mean(), abs=1e-3)
    assert (out / "dvh.png").stat().st_size > 10_000
    # a second run must not overwrite silently
    assert main(["dvh", "--case", str(nrrd_case), "--out", str(out)]) == 2
    assert "--force" in _error_line(capsys)
    assert main(["dvh", "--case", str(nrrd_case), "--out", str(out), "--force"]) == 0


def test_dvh_with_separate_dose_and_reference(nrrd_case, tmp_path, small_case):
    dose_path = images.write_image(small_case.dose * 0.9, small_case.geometry, tmp_path / "other.nii.gz")
    out = tmp_path / "cmp"
    assert main(["dvh", "--case", str(nrrd_case), "--dose", str(dose_path), "--reference",
                 str(nrrd_case / "dose.nrrd"), "--out", str(out)]) == 0
    assert (out / "dvh.png").exists()


@pytest.mark.parametrize("problem", ["missing_case", "missing_dose", "mismatched_grid", "nan_dose", "empty_structure",
                                     "not_a_case"])
def test_bad_input_gives_one_line_error(problem, nrrd_case, tmp_path, small_case, capsys):
    from doseai.geometry import ImageGeometry

    case, dose = str(nrrd_case), str(nrrd_case / "dose.nrrd")
    expected = ""
    if problem == "missing_case":
        case, expected = str(tmp_path / "nowhere"), "no such file"
    elif problem == "missing_dose":
        dose, expected = str(tmp_path / "nowhere.nrrd"), "no such dose file"
    elif problem == "mismatched_grid":
        coarse = ImageGeometry((12, 24, 24), (8.0, 8.0, 6.0), small_case.geometry.origin)
        dose = str(images.write_image(np.zeros(coarse.shape, np.float32), coarse, tmp_path / "coarse.nrrd"))
        expected = "different grid"
    elif problem == "nan_dose":
        bad = small_case.dose.copy()
        bad[3, 3, 3] = np.nan
        dose = str(images.write_image(bad, small_case.geometry, tmp_path / "nan.nrrd"))
        expected = "NaN"
    elif problem == "empty_structure":
        masks = dict(small_case.structures, Larynx=np.zeros(small_case.geometry.shape, bool))
        images.write_seg_nrrd(masks, small_case.geometry, nrrd_case / "structures.seg.nrrd", force=True)
        expected = "empty structure(s) Larynx"
    elif problem == "not_a_case":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "readme.txt").write_text("hello")
        case, expected = str(tmp_path / "notes"), "not a planning case"
    assert main(["dvh", "--case", case, "--dose", dose]) == 2
    line = _error_line(capsys)
    assert line.startswith("doseai dvh: error:") and expected in line


def test_convert_between_formats(nrrd_case, tmp_path):
    assert main(["convert", "--case", str(nrrd_case), "--to", "nifti", "--out", str(tmp_path / "nii")]) == 0
    assert (tmp_path / "nii" / "ct.nii.gz").exists() and (tmp_path / "nii" / "structures.nii.gz").exists()
    assert main(["convert", "--case", str(tmp_path / "nii"), "--to", "nrrd", "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "structures.seg.nrrd").exists()
    assert main(["convert", "--case", str(nrrd_case), "--to", "nrrd", "--out", str(tmp_path / "back")]) == 2


def test_evaluate_reports_missing_predictions(tmp_path, capsys, small_case):
    from doseai.io import openkbp

    reference = tmp_path / "reference"
    reference.mkdir()
    (tmp_path / "predictions").mkdir()
    openkbp.save_npz(small_case, reference / "pt_1.npz")
    assert main(["evaluate", "--reference", str(reference), "--predictions", str(tmp_path / "predictions")]) == 2
    assert "no prediction for 1 patient(s): pt_1" in _error_line(capsys)


def test_demo_and_predict_with_the_shipped_model(tmp_path, capsys):
    """The README main command: sample case -> predicted dose -> DICOM + NRRD + DVH report; then
    `doseai predict` on the written DICOM case, to RTDOSE, with a slider moved."""
    pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
    from doseai.io import load_case
    from doseai.io.dicom import read_rtdose
    from doseai.predict import DEFAULT_MODEL

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-plan"]) == 0
    printed = capsys.readouterr().out
    assert f"predicted the dose with {DEFAULT_MODEL.stem}" in printed and "PTV_70" in printed
    for name in ("dicom/RD.dcm", "dicom/RS.dcm", "nrrd/dose.nrrd", "report/dvh.png", "report/metrics.csv"):
        assert (out / name).is_file(), name
    assert not (out / "plan").exists()  # --no-plan: the plan step is tested in test_cli_optimize.py
    case = load_case(out / "dicom")
    assert case.dose is not None and case.dose.max() > 0.8 * 70

    rtdose = tmp_path / "spared.dcm"
    assert main(["predict", "--case", str(out / "dicom"), "--oar-sparing", "1", "--out", str(rtdose)]) == 0
    dose, geometry, meta = read_rtdose(rtdose)
    assert geometry.matches(case.geometry)
    assert meta["StudyInstanceUID"] == case.metadata["StudyInstanceUID"]
    assert meta["FrameOfReferenceUID"] == case.metadata["FrameOfReferenceUID"]
    oar = np.concatenate([case.structures[n].ravel() for n in case.oars])
    assert np.concatenate([dose.ravel()] * len(case.oars))[oar].mean() < np.concatenate(
        [case.dose.ravel()] * len(case.oars))[oar].mean()  # OAR sparing lowered the OAR doses
    assert main(["predict", "--case", str(out / "dicom"), "--out", str(rtdose)]) == 2  # no silent overwrite
    raw = tmp_path / "raw.dcm"
    assert main(["predict", "--case", str(out / "dicom"), "--oar-sparing", "1", "--no-calibration",
                 "--out", str(raw)]) == 0
    assert "no calibration" in capsys.readouterr().out
    assert not np.allclose(read_rtdose(raw)[0], dose, atol=0.05)  # the calibration changes the dose
    mirrored = tmp_path / "mirrored.dcm"
    assert main(["predict", "--case", str(out / "dicom"), "--oar-sparing", "1", "--mirror-average",
                 "--out", str(mirrored)]) == 0
    assert "mirror-averaged" in capsys.readouterr().out
    assert not np.allclose(read_rtdose(mirrored)[0], dose, atol=0.05)
    for flag in ("--mirror-neutral", "--no-mirror-neutral"):  # the card's default either way
        assert main(["predict", "--case", str(out / "dicom"), "--oar-sparing", "1", flag,
                     "--out", str(tmp_path / f"{flag}.dcm")]) == 0
        assert ("mirror-averaged at neutral" in capsys.readouterr().out) == (flag == "--mirror-neutral")
    assert not np.allclose(read_rtdose(tmp_path / "--mirror-neutral.dcm")[0],
                           read_rtdose(tmp_path / "--no-mirror-neutral.dcm")[0], atol=0.05)
    assert main(["predict", "--case", str(out / "dicom"), "--homogeneity", "3", "--out", str(tmp_path / "x.nrrd")]) == 2
