"""DosePreference/Scripts/batch_predict.py outside Slicer: two generated DICOM studies, one without its
RTSTRUCT. The broken one is reported and skipped, the other gets its RTDOSE and DVH report, the
summary lists both and the exit code says that a case failed. Uses the shipped model."""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")

from doseai.io.dicom import read_rtdose, write_dicom_case  # noqa: E402
from doseai.predict import DEFAULT_MODEL  # noqa: E402
from doseai.sample import make_sample_case  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "DosePreference" / "Scripts" / "batch_predict.py"
# the shipped model; DOSEAI_TEST_WEIGHTS points at another one (e.g. a throwaway model while it trains)
WEIGHTS = Path(os.environ.get("DOSEAI_TEST_WEIGHTS") or DEFAULT_MODEL)


@pytest.fixture(scope="module")
def batch():
    spec = importlib.util.spec_from_file_location("batch_predict", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["batch_predict"] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("batch_predict", None)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """DICOM_ROOT with pt_good (CT + RTSTRUCT + a clinical RTDOSE) and pt_broken (its RTSTRUCT deleted)."""
    if not WEIGHTS.is_file():
        pytest.skip(f"model weights not found at {WEIGHTS}")
    root = tmp_path_factory.mktemp("dicom_root")
    for seed, name in ((5, "pt_good"), (6, "pt_broken")):
        write_dicom_case(make_sample_case(seed=seed, shape=(32, 64, 64), with_dose=name == "pt_good"), root / name)
    (root / "pt_broken" / "RS.dcm").unlink()
    return root


def _summary(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["patient"]: row for row in csv.DictReader(handle)}


def test_batch_reports_the_broken_study_and_writes_the_good_one(batch, studies, tmp_path, capsys):
    out = tmp_path / "out"
    code = batch.main(["--input", str(studies), "--output", str(out), "--oar-sparing", "0.5",
                       "--weights", str(WEIGHTS), "--device", "cpu"])
    assert code == 1
    printed = capsys.readouterr()
    assert "pt_broken" in printed.err and "1 of 2 patient(s) failed" in printed.err

    rows = _summary(out / "summary.csv")
    assert list(rows) == ["pt_broken", "pt_good"]
    assert list(next(iter(rows.values()))) == list(batch.SUMMARY_COLUMNS)
    broken, good = rows["pt_broken"], rows["pt_good"]
    assert broken["status"] == "failed" and "no target with a prescription" in broken["error"]
    assert "no RTSTRUCT" in broken["error"]  # the warning that explains the failure
    assert broken["ptv_d95_gy"] == "" and not (out / "pt_broken").exists()
    assert good["status"] == "done" and good["error"] == "" and good["ptv"] == "PTV_70"
    assert 0 < float(good["ptv_d95_gy"]) < 80 and 0 < float(good["mean_oar_dose_gy"]) < 70
    assert float(good["seconds"]) > 0
    assert "pt_good" in printed.out and "summary.csv" in printed.out  # the table is printed too

    written = out / "pt_good"
    assert sorted(p.name for p in written.iterdir()) == sorted(batch.PATIENT_FILES)
    dose, geometry, meta = read_rtdose(written / "RD.dcm")
    from doseai.io.dicom import read_dicom_case

    case = read_dicom_case(studies / "pt_good")
    assert geometry.matches(case.geometry) and np.isfinite(dose).all() and dose.max() > 0
    assert meta["StudyInstanceUID"] == case.metadata["StudyInstanceUID"]  # lands in the patient's study
    assert meta["FrameOfReferenceUID"] == case.metadata["FrameOfReferenceUID"]
    metrics = _summary_metrics(written / "metrics.csv")
    assert float(good["ptv_d95_gy"]) == pytest.approx(float(metrics["PTV_70"]["D95"]), abs=0.01)
    assert (written / "dvh.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # outputs are never overwritten without --force: the whole run refuses before predicting anything
    assert batch.main(["--input", str(studies), "--output", str(out), "--weights", str(WEIGHTS)]) == 2
    assert "exists" in capsys.readouterr().err


def _summary_metrics(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["structure"]: row for row in csv.DictReader(handle)}


def test_batch_refuses_bad_arguments(batch, studies, tmp_path, capsys):
    assert batch.main(["--input", str(tmp_path / "absent"), "--output", str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert batch.main(["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "no patient subfolders" in capsys.readouterr().err
    assert batch.main(["--input", str(studies), "--output", str(tmp_path / "o"), "--oar-sparing", "2",
                       "--weights", str(WEIGHTS)]) == 2
    assert "--oar-sparing must be within" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_summary_helpers(batch):
    results = [batch.PatientResult("pt_1", "done", "", "PTV_70", 66.512, 31.0, 2.04),
               batch.PatientResult("pt_2", "failed", "no target", seconds=0.1)]
    assert results[0].row() == ["pt_1", "done", "", "PTV_70", "66.51", "31.00", "2.0"]
    table = batch.format_summary(results).splitlines()
    assert table[0].split() == ["patient", "status", "ptv", "ptv_d95_gy", "mean_oar_dose_gy", "seconds", "error"]
    assert table[1].split() == ["pt_1", "done", "PTV_70", "66.51", "31.00", "2.0"]
    assert table[2].split() == ["pt_2", "failed", "0.1", "no", "target"]  # the message last


def test_script_runs_as_a_program(tmp_path):
    """``python batch_predict.py ...`` (as Slicer's --python-script runs it): arguments from sys.argv, exit code."""
    import subprocess

    done = subprocess.run([sys.executable, str(SCRIPT), "--input", str(tmp_path / "absent"), "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a folder" in done.stderr
