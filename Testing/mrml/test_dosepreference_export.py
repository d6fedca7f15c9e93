"""DosePreference export on slicer-core: RTDOSE + DVH CSV + metrics CSV of a dose node, in the CT's DICOM
study when the CT came from DICOM (read through a lookup callable, standing in for Slicer's DICOM
database), never overwriting without being asked."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from DosePreferenceLib import DosePreferenceLogic, dicom_reference, export_paths, instance_uids, safe_file_stem

from doseai.errors import DoseAIError, OutputExistsError
from doseai.io.dicom import read_rtdose
from doseai.mrml import nodes_from_case

pytestmark = pytest.mark.mrml

CT_UIDS = ["1.2.3.4.100", "1.2.3.4.101"]
DATABASE = {  # (instance UID, tag) -> value, as ctkDICOMDatabase.instanceValue answers
    ("1.2.3.4.100", "0020,000D"): "1.2.3.4.1",  # StudyInstanceUID
    ("1.2.3.4.100", "0020,0052"): "1.2.3.4.2",  # FrameOfReferenceUID
    ("1.2.3.4.100", "0010,0020"): "HN-042",  # PatientID
    ("1.2.3.4.100", "0010,0010"): "Doe^Jane",  # PatientName
    ("1.2.3.4.100", "0008,0020"): "20240102",  # StudyDate
}


def _lookup(uid: str, tag: str) -> str:
    return DATABASE.get((uid, tag), "")


def test_dicom_reference_from_the_ct_series(scene, mrml_case):
    ct_node, seg_node, _ = nodes_from_case(scene, mrml_case)
    assert dicom_reference(ct_node, _lookup) == {}  # not from DICOM: the RTDOSE gets fresh UIDs
    ct_node.SetAttribute("DICOM.instanceUIDs", " ".join(CT_UIDS))
    assert instance_uids(ct_node) == CT_UIDS
    assert dicom_reference(ct_node, None) == {}  # no database
    assert dicom_reference(ct_node, _lookup) == {
        "StudyInstanceUID": "1.2.3.4.1", "FrameOfReferenceUID": "1.2.3.4.2", "PatientID": "HN-042",
        "PatientName": "Doe^Jane", "StudyDate": "20240102"}
    seg_node.SetAttribute("DICOM.instanceUIDs", "1.2.3.4.300")  # loaded from an RTSTRUCT
    assert dicom_reference(ct_node, _lookup, seg_node)["RTStructSOPInstanceUID"] == "1.2.3.4.300"
    asked = []
    dicom_reference(ct_node, lambda uid, tag: asked.append(uid) or "")
    assert set(asked) == {CT_UIDS[0]}  # one instance answers for the series


def test_export_writes_rtdose_in_the_ct_study_and_the_dvh(scene, mrml_case, tmp_path):
    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    ct_node.SetAttribute("DICOM.instanceUIDs", " ".join(CT_UIDS))
    dose_node.SetName("pt 1 predicted/dose")
    for key, value in (("DoseAI.Model", "dose_preference_v2_3"), ("DoseAI.OarSparing", "0.5"),
                       ("DoseAI.Homogeneity", "-0.25")):
        dose_node.SetAttribute(key, value)
    logic = DosePreferenceLogic()
    folder = tmp_path / "new" / "folder"
    paths = logic.exportResults(ct_node, seg_node, dose_node, folder, lookup=_lookup)
    assert paths == export_paths(folder, "pt_1_predicted_dose")
    assert [p.name for p in paths.values()] == ["pt_1_predicted_dose_RTDOSE.dcm", "pt_1_predicted_dose_RTPLAN.dcm",
                                                "pt_1_predicted_dose_dvh.csv", "pt_1_predicted_dose_metrics.csv"]
    assert all(path.is_file() for path in paths.values())

    dose, geometry, meta = read_rtdose(paths["rtdose"])
    assert geometry.matches(mrml_case.geometry)
    assert np.abs(dose - mrml_case.dose).max() <= 1e-3 * mrml_case.dose.max()
    assert meta["StudyInstanceUID"] == "1.2.3.4.1" and meta["FrameOfReferenceUID"] == "1.2.3.4.2"
    assert meta["PatientID"] == "HN-042" and str(meta["PatientName"]) == "Doe^Jane"
    assert meta["SeriesDescription"] == "DoseAI dose_preference_v2_3 OAR +0.50 HI -0.25"

    with open(paths["metrics"], newline="") as handle:
        metrics = {row["structure"]: row for row in csv.DictReader(handle)}
    assert set(metrics) == set(mrml_case.structures)
    ptv = mrml_case.dose[mrml_case.structures["PTV_70"]]
    assert float(metrics["PTV_70"]["Dmean"]) == pytest.approx(ptv.mean(), abs=1e-3)
    with open(paths["dvh"], newline="") as handle:
        header = next(csv.reader(handle))
    assert header[0] == "dose_gy" and "PTV_70_volume_pct" in header


def test_export_without_dicom_gets_fresh_uids(scene, mrml_case, tmp_path):
    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    logic = DosePreferenceLogic()
    assert logic.dicomLookup() is None  # the Qt-free logic has no DICOM database
    first = read_rtdose(logic.exportResults(ct_node, seg_node, dose_node, tmp_path / "a")["rtdose"])[2]
    second = read_rtdose(logic.exportResults(ct_node, seg_node, dose_node, tmp_path / "b")["rtdose"])[2]
    assert first["StudyInstanceUID"] and first["StudyInstanceUID"] != second["StudyInstanceUID"]
    assert first["SeriesDescription"] == dose_node.GetName()  # not a prediction: described by its name


def test_export_never_overwrites_without_being_asked(scene, mrml_case, tmp_path):
    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    logic = DosePreferenceLogic()
    paths = export_paths(tmp_path, safe_file_stem(dose_node.GetName()))
    paths["dvh"].write_text("mine")  # one of the three exists: nothing at all is written
    with pytest.raises(OutputExistsError, match=paths["dvh"].name):
        logic.exportResults(ct_node, seg_node, dose_node, tmp_path)
    assert not paths["rtdose"].exists() and paths["dvh"].read_text() == "mine"
    written = logic.exportResults(ct_node, seg_node, dose_node, tmp_path, force=True)  # the user said yes
    assert all(p.is_file() for p in written.values()) and paths["dvh"].read_text() != "mine"

    with pytest.raises(DoseAIError, match="dose"):
        logic.exportResults(ct_node, seg_node, None, tmp_path)
    with pytest.raises(DoseAIError, match="export folder"):
        logic.exportResults(ct_node, seg_node, dose_node, "  ")


def test_file_stems():
    assert safe_file_stem("pt 1 predicted dose") == "pt_1_predicted_dose"
    assert safe_file_stem("Ünïcode / ..") == "n_code"
    assert safe_file_stem("...") == "dose"
