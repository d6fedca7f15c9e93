"""DICOM that a TPS and Slicer file correctly: dciodvfy (dicom3tools) finds no error in the CT, RTSTRUCT and RTPLAN
the project writes; the RTDOSE (which dciodvfy cannot read: it aborts on 32-bit pixel data) holds every Type 1 and
1C attribute of the RT Dose IOD (PS3.3 A.18) and its references resolve; every object shares the CT's patient, study
and frame of reference, the plan's RTDOSE too."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from doseai.io.dicom import write_dicom_case
from doseai.io.dicom import PlanBeam, PlanDescription, write_rtplan
from doseai.sample import make_sample_case

DCIODVFY = shutil.which("dciodvfy")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    case = make_sample_case(seed=3, shape=(24, 48, 48), spacing_xyz=(4.0, 4.0, 3.0))
    folder = tmp_path_factory.mktemp("dicom")
    return case, write_dicom_case(case, folder), folder


def _dciodvfy_errors(path) -> list[str]:
    if DCIODVFY is None:
        if os.environ.get("DOSEAI_REQUIRE_DCIODVFY"):
            pytest.fail("dciodvfy not found, and DOSEAI_REQUIRE_DCIODVFY is set (apt-get install dicom3tools)")
        pytest.skip("dciodvfy not installed (Debian: apt-get install dicom3tools)")
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("what", ["ct", "rtstruct", "rtplan"])
def test_dciodvfy_finds_no_error(what, written):
    _, files, folder = written
    path = {"ct": files["ct_files"][0], "rtstruct": files["rtstruct"], "rtplan": files["rtplan"]}[what]
    assert _dciodvfy_errors(path) == []


def test_dciodvfy_finds_no_error_in_a_plan_with_beams(written, tmp_path):
    case, files, _ = written
    reference = {**files, "RTStructSOPInstanceUID": files["RTStructSOPInstanceUID"]}
    beams = [PlanBeam(gantry_deg=g, isocenter_lps_mm=(1.0, 2.0, 3.0), jaws_mm=(-40, 35, -30, 45.5))
             for g in (0, 40, 320)]
    path = tmp_path / "RP.dcm"
    write_rtplan(path, reference, PlanDescription(label="test plan", prescriptions=case.prescriptions, beams=beams))
    assert _dciodvfy_errors(path) == []
    plan = pydicom.dcmread(path)
    assert [float(b.ControlPointSequence[0].GantryAngle) for b in plan.BeamSequence] == [0, 40, 320]
    assert int(plan.FractionGroupSequence[0].NumberOfBeams) == 3


# PS3.3 A.18.3: the Type 1 (and here applicable 1C) attributes of the RT Dose IOD's modules
RTDOSE_TYPE1 = (
    "SOPClassUID", "SOPInstanceUID",  # SOP Common
    "StudyInstanceUID",  # General Study
    "Modality", "SeriesInstanceUID",  # RT Series
    "FrameOfReferenceUID",  # Frame of Reference
    "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",  # Image Plane
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "PixelData",  # Image Pixel / RT Dose (1C: pixel data present)
    "NumberOfFrames", "FrameIncrementPointer",  # Multi-frame
    "DoseUnits", "DoseType", "DoseSummationType", "GridFrameOffsetVector", "DoseGridScaling",  # RT Dose
    "ReferencedRTPlanSequence",  # RT Dose 1C: DoseSummationType is PLAN
)
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
         "ReferringPhysicianName", "AccessionNumber", "SliceThickness", "PositionReferenceIndicator", "Manufacturer")


def test_rtdose_holds_every_required_attribute_and_its_references_resolve(written):
    _, files, folder = written
    dose = pydicom.dcmread(files["rtdose"])
    missing = [key for key in RTDOSE_TYPE1 if key not in dose or dose.data_element(key).is_empty]
    assert missing == []
    assert [key for key in TYPE2 if key not in dose] == []
    assert dose.DoseSummationType == "PLAN" and dose.SamplesPerPixel == 1 and dose.BitsAllocated == 32
    assert int(dose.NumberOfFrames) == len(dose.GridFrameOffsetVector)
    plan = pydicom.dcmread(files["rtplan"])
    structures = pydicom.dcmread(files["rtstruct"])
    ct = pydicom.dcmread(files["ct_files"][0])
    assert dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert dose.ReferencedRTPlanSequence[0].ReferencedSOPClassUID == plan.SOPClassUID
    assert dose.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == structures.SOPInstanceUID
    assert plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == structures.SOPInstanceUID
    for other in (plan, structures, dose):
        for key in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
            assert other[key].value == ct[key].value, (other.Modality, key)
    assert plan.PlanIntent == "RESEARCH" and plan.ApprovalStatus == "UNAPPROVED"
    assert "predicted" in plan.RTPlanDescription and "not a deliverable plan" in plan.RTPlanDescription
    assert {item.DoseReferenceDescription for item in plan.DoseReferenceSequence} == set(written[0].prescriptions)


def test_the_rtdose_refuses_to_overwrite_its_rtplan(written, tmp_path):
    from doseai.errors import OutputExistsError
    from doseai.io.dicom import write_rtdose

    case, files, _ = written
    (tmp_path / "RP.dcm").write_text("someone's plan")
    with pytest.raises(OutputExistsError):
        write_rtdose(case.dose, case.geometry, tmp_path / "RD.dcm", files)
    assert not (tmp_path / "RD.dcm").exists() and (tmp_path / "RP.dcm").read_text() == "someone's plan"


def test_the_plan_of_a_dicom_case_joins_its_study(tmp_path):
    """`doseai optimize` on a DICOM case: its RTDOSE and RTPLAN (with beams) sit in the CT's patient, study and
    frame of reference and reference its RTSTRUCT, so Slicer puts the plan's dose over the CT."""
    pytest.importorskip("pyRadPlan", reason="pyRadPlan not installed (see README)")
    from doseai.cli import main

    folder = tmp_path / "dicom"
    files = write_dicom_case(make_sample_case(seed=1), folder)  # the grid test_cli_optimize plans on
    out = tmp_path / "plan"
    assert main(["optimize", "--case", str(folder), "--out", str(out), "--beams", "3", "--bixel-mm", "10",
                 "--lateral-cutoff-mm", "30", "--max-iterations", "20"]) == 0
    dose, plan = pydicom.dcmread(out / "RD_plan.dcm"), pydicom.dcmread(out / "RP_plan.dcm")
    ct = pydicom.dcmread(files["ct_files"][0])
    for other in (dose, plan):
        for key in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
            assert other[key].value == ct[key].value, (other.Modality, key)
    assert dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert dose.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == files["RTStructSOPInstanceUID"]
    assert len(plan.BeamSequence) == 3 and _dciodvfy_errors(out / "RP_plan.dcm") == []
    isocentre = np.array(plan.BeamSequence[0].ControlPointSequence[0].IsocenterPosition, float)
    assert np.isfinite(isocentre).all()
