"""``doseai optimize`` and ``doseai objectives``: every output file, TPS columns, no silent overwrite,
one-line errors. Few beams and coarse bixels keep the dose engine to seconds."""

import csv
import json

import numpy as np
import pytest

from doseai.cli import main
from doseai.io import images, save_case

pytest.importorskip("pyRadPlan", reason="pyRadPlan not installed (see README: pip install --no-deps pyradplan)")

FAST = ["--beams", "3", "--bixel-mm", "10", "--lateral-cutoff-mm", "30", "--max-iterations", "40"]


@pytest.fixture(scope="module")
def sample_case(tmp_path_factory):
    from doseai.sample import make_sample_case

    return save_case(make_sample_case(seed=1), tmp_path_factory.mktemp("sample") / "case", "nrrd")


def test_optimize_writes_the_plan_and_refuses_to_overwrite(sample_case, tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["optimize", "--case", str(sample_case), "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "3 beams" in printed and "PTV_70" in printed
    dose, geometry = images.read_image(out / "plan_dose.nrrd")
    assert dose.max() > 30 and np.isfinite(dose).all()
    from doseai.io.dicom import read_rtdose

    rtdose, rt_geometry, _ = read_rtdose(out / "RD_plan.dcm")
    assert rt_geometry.matches(geometry) and np.abs(rtdose - dose).max() <= 0.01
    fluence = np.load(out / "fluence.npz")
    assert fluence["weights"].min() >= 0 and {"map_beam0", "map_beam2"} <= set(fluence.files)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"]["energy_mv"] == 6.0 and summary["settings"]["mode"] == "mimic"
    assert summary["achieved_vs_desired_mae_gy"] < 10
    assert (out / "dvh_comparison.png").stat().st_size > 10_000 and (out / "fluence.png").stat().st_size > 5_000
    stamp = (out / "plan_dose.nrrd").stat().st_mtime_ns
    assert main(["optimize", "--case", str(sample_case), "--out", str(out), *FAST]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "plan_dose.nrrd").stat().st_mtime_ns == stamp


def test_objectives_for_a_tps(sample_case, tmp_path, capsys):
    out = tmp_path / "objectives"
    assert main(["objectives", "--case", str(sample_case), "--out", str(out)]) == 0
    with open(out / "objectives.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["structure", "type", "dose_gy", "volume_pct", "priority", "note"]
    coverage = [r for r in rows if r["structure"] == "PTV_70" and r["type"] == "min DVH"]
    assert coverage and float(coverage[0]["dose_gy"]) == pytest.approx(70.0)
    assert len(json.loads((out / "objectives.json").read_text())["objectives"]) == len(rows)
    assert main(["objectives", "--case", str(sample_case), "--out", str(out)]) == 2


def test_optimize_needs_a_dose(tmp_path, capsys):
    from doseai.sample import make_sample_case

    case = save_case(make_sample_case(seed=1, with_dose=False), tmp_path / "nodose", "nrrd")
    assert main(["optimize", "--case", str(case), "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "pass --dose" in capsys.readouterr().err
