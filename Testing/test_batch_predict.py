"""DosePreference/Scripts/batch_predict.py outside Slicer: two generated DICOM studies, one without its
RTSTRUCT. The broken one is reported and skipped, the other gets its RTDOSE and DVH report, the
summary lists both and the exit code says that a case failed. Split into shards (--shard K/N) and merged
(--merge), three studies give what one run gives. Uses the shipped model."""

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


@pytest.fixture(scope="module")
def three_studies(tmp_path_factory):
    """DICOM_ROOT with pt_a, pt_b (its RTSTRUCT deleted: a failure) and pt_c, small and without clinical dose."""
    if not WEIGHTS.is_file():
        pytest.skip(f"model weights not found at {WEIGHTS}")
    root = tmp_path_factory.mktemp("dicom_three")
    for seed, name in ((7, "pt_a"), (8, "pt_b"), (9, "pt_c")):
        write_dicom_case(make_sample_case(seed=seed, shape=(24, 48, 48), with_dose=False), root / name)
    (root / "pt_b" / "RS.dcm").unlink()
    return root


def _without_seconds(path: Path) -> dict[str, dict[str, str]]:
    return {patient: {key: value for key, value in row.items() if key != "seconds"}
            for patient, row in _summary(path).items()}


def test_two_shards_and_the_merge_give_what_one_run_gives(batch, three_studies, tmp_path, capsys):
    common = ["--input", str(three_studies), "--weights", str(WEIGHTS), "--device", "cpu", "--oar-sparing", "0.5"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert batch.main(common + ["--output", str(whole)]) == 1  # pt_b fails
    capsys.readouterr()

    # shard 0/2: sorted positions 0 and 2 (pt_a, pt_c), all done; its own summary, no summary.csv
    assert batch.main(common + ["--output", str(split), "--shard", "0/2"]) == 0
    printed = capsys.readouterr().out
    assert "shard 0/2: 2 of 3 patient folder(s)" in printed and "summary.shard-0-of-2.csv" in printed
    assert sorted(p.name for p in split.iterdir()) == ["pt_a", "pt_c", "summary.shard-0-of-2.csv"]
    # the merge refuses while shard 1 is missing, and names it
    assert batch.main(["--merge", "--output", str(split)]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 shard(s) missing" in err and "summary.shard-1-of-2.csv" in err
    assert not (split / "summary.csv").exists()

    assert batch.main(common + ["--output", str(split), "--shard", "1/2"]) == 1  # pt_b: a shard counts its own
    assert "1 of 1 patient(s) failed: pt_b" in capsys.readouterr().err
    assert batch.main(["--merge", "--output", str(split)]) == 1  # a failure in any shard
    printed = capsys.readouterr()
    assert "1 of 3 patient(s) failed: pt_b" in printed.err
    assert "pt_c" in printed.out and "merged 2 shard summaries" in printed.out  # the table, like a run

    assert list(_summary(split / "summary.csv")) == ["pt_a", "pt_b", "pt_c"]  # patient order
    assert _without_seconds(split / "summary.csv") == _without_seconds(whole / "summary.csv")
    for patient in ("pt_a", "pt_c"):
        assert sorted(p.name for p in (split / patient).iterdir()) == sorted(batch.PATIENT_FILES)
        dose_split, dose_whole = read_rtdose(split / patient / "RD.dcm")[0], read_rtdose(whole / patient / "RD.dcm")[0]
        np.testing.assert_array_equal(dose_split, dose_whole)
        assert (split / patient / "dvh.csv").read_bytes() == (whole / patient / "dvh.csv").read_bytes()
    assert not (split / "pt_b").exists()

    # summary.csv is not overwritten without --force; with it the merge writes the same file again
    before = (split / "summary.csv").read_bytes()
    assert batch.main(["--merge", "--output", str(split)]) == 2
    assert "exists" in capsys.readouterr().err
    assert batch.main(["--merge", "--output", str(split), "--force"]) == 1
    assert (split / "summary.csv").read_bytes() == before


def test_shard_refuses_bad_text(batch, studies, tmp_path, capsys):
    out = tmp_path / "o"
    for text, message in (("1", "give K/N"), ("a/2", "give K/N"), ("1/2/3", "give K/N"), ("0/0", "at least 1"),
                          ("2/2", "K must be within 0..1"), ("-1/2", "K must be within 0..1")):
        assert batch.main(["--input", str(studies), "--output", str(out), f"--shard={text}",  # = : "-1/2" too
                           "--weights", str(WEIGHTS)]) == 2, text
        assert message in capsys.readouterr().err, text
    assert not out.exists()  # refused before anything is written
    assert batch.parse_shard(" 3 / 4 ") == (3, 4)
    with pytest.raises(SystemExit) as stop:  # --merge takes only the output folder
        batch.main(["--merge", "--output", str(out), "--shard", "0/2"])
    assert stop.value.code == 2 and "takes no --input or --shard" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # without --merge, --input is required as before
        batch.main(["--output", str(out)])
    assert "required: --input" in capsys.readouterr().err


def _shard_summary(batch, folder: Path, index: int, count: int, patients: list[str]) -> None:
    results = [batch.PatientResult(name, "done", "", "PTV_70", 66.5, 30.25, 1.5) for name in patients]
    batch.write_summary(results, folder / batch.shard_summary_name(index, count))


def test_merge_refusals_and_an_empty_shard(batch, tmp_path, capsys):
    """Without the model: shard summaries written by hand."""
    assert batch.main(["--merge", "--output", str(tmp_path / "absent")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert batch.main(["--merge", "--output", str(tmp_path)]) == 2
    assert "no shard summaries" in capsys.readouterr().err

    # 3 shards of 2 patients: shard 2 has none at its positions, and an empty summary
    for index, patients in enumerate((["p1"], ["p2"], [])):
        _shard_summary(batch, tmp_path, index, 3, patients)
    assert batch.main(["--merge", "--output", str(tmp_path)]) == 0
    capsys.readouterr()
    assert batch.read_summary(tmp_path / "summary.csv") == [
        batch.PatientResult("p1", "done", "", "PTV_70", 66.5, 30.25, 1.5),
        batch.PatientResult("p2", "done", "", "PTV_70", 66.5, 30.25, 1.5)]

    # a stale summary of another split: both counts are named
    _shard_summary(batch, tmp_path, 0, 2, ["p1"])
    assert batch.main(["--merge", "--output", str(tmp_path), "--force"]) == 2
    err = capsys.readouterr().err
    assert "disagree on N" in err and "summary.shard-0-of-2.csv says N=2" in err and "N=3" in err
    (tmp_path / "summary.shard-0-of-2.csv").unlink()

    # shards that cannot come from one folder: counts that do not fit, a patient twice, out of order
    for patients, message in (((["p1", "p3"], ["p2"], []), "do not split one list"),
                              ((["p1"], ["p1"], []), "more than one shard"),
                              ((["p2"], ["p1"], []), "sorted order")):
        for index, names in enumerate(patients):
            _shard_summary(batch, tmp_path, index, 3, names)
        assert batch.main(["--merge", "--output", str(tmp_path), "--force"]) == 2
        assert message in capsys.readouterr().err

    (tmp_path / "summary.shard-1-of-3.csv").write_text("name,dose\np2,1\n")
    assert batch.main(["--merge", "--output", str(tmp_path), "--force"]) == 2
    assert "not a batch summary" in capsys.readouterr().err
