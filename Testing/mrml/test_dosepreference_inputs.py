"""DosePreference inputs without Qt: the structure-mapping table (segment names -> rows -> overrides and
prescriptions, and what is wrong with it), the model card's slider texts, the packages each action needs."""

from __future__ import annotations

import numpy as np
import pytest
from DosePreferenceLib import (
    SHARED_SESSION,
    TASK_PACKAGES,
    DosePreferenceLogic,
    StructureRow,
    check_mapping,
    default_row,
    install_plan,
    mapping_arguments,
    missing_packages_for,
    model_oars,
    rows_from_json,
    rows_to_json,
    slider_tooltips,
    structure_rows,
)

from doseai.mrml import case_from_nodes, nodes_from_case
from doseai.structures import OPENKBP_OARS

pytestmark = pytest.mark.mrml

CLINICAL_NAMES = ["BODY", "Lt Parotid", "parotid_rt", "Cord", "PTV7000", "PTV_High", "z_ring", "GTV"]


def test_default_rows_follow_the_names():
    rows = {row.segment: row for row in structure_rows(CLINICAL_NAMES)}
    assert list(rows) == CLINICAL_NAMES  # segmentation order
    assert rows["BODY"] == StructureRow("BODY", "External", "body")
    assert rows["Lt Parotid"] == StructureRow("Lt Parotid", "Parotid_L", "OAR")
    assert rows["parotid_rt"].canonical == "Parotid_R" and rows["Cord"].canonical == "SpinalCord"
    assert rows["PTV7000"] == StructureRow("PTV7000", "PTV_70", "target", 70.0)
    assert rows["PTV_High"] == StructureRow("PTV_High", "PTV", "target", None)  # target, dose unknown
    assert rows["z_ring"] == StructureRow("z_ring", "z_ring", "OAR")  # unknown names are kept
    assert default_row("GTV").role == "target"


def test_user_edits_survive_a_refresh():
    rows = structure_rows(CLINICAL_NAMES)
    rows[5] = StructureRow("PTV_High", "PTV_66", "target", 66.0)
    rows[6] = StructureRow("z_ring", "z_ring", "ignored")
    again = structure_rows(["New", *CLINICAL_NAMES[:6], "z_ring"], previous=rows)  # GTV gone, New added
    assert [row.segment for row in again] == ["New", *CLINICAL_NAMES[:6], "z_ring"]
    assert again[6] == rows[5] and again[7] == rows[6] and again[0] == default_row("New")
    assert rows_from_json(rows_to_json(again)) == again
    assert rows_from_json("") == [] and rows_from_json("not json") == [] and rows_from_json('[{"x": 1}]') == []


def test_mapping_arguments_are_what_the_table_says():
    rows = structure_rows(CLINICAL_NAMES)
    rows[5] = StructureRow("PTV_High", "PTV_66", "target", 66.0)
    rows[6] = StructureRow("z_ring", "z_ring", "ignored")
    rows[7] = StructureRow("GTV", "GTV", "ignored")
    overrides, prescriptions = mapping_arguments(rows)
    assert overrides == {"BODY": "External", "Lt Parotid": "Parotid_L", "parotid_rt": "Parotid_R",
                         "Cord": "SpinalCord", "PTV7000": "PTV_70", "PTV_High": "PTV_66", "z_ring": None, "GTV": None}
    assert prescriptions == {"PTV_70": 70.0, "PTV_66": 66.0}
    check = check_mapping(rows, OPENKBP_OARS)
    assert check.ok, check.errors
    assert check.notes == ["Not in the segmentation (empty model inputs): Brainstem, Esophagus, Larynx, Mandible."]


@pytest.mark.parametrize("edit, expected", [
    ({4: StructureRow("PTV7000", "PTV_70", "ignored"), 5: StructureRow("PTV_High", "PTV", "OAR")},
     "Missing required structure: at least one target (PTV) with a prescription"),
    ({5: StructureRow("PTV_High", "PTV", "target", None)}, "Target 'PTV': enter its prescription in Gy."),
    ({5: StructureRow("PTV_High", "PTV", "target", -3.0)}, "Target 'PTV': enter its prescription in Gy."),
    ({2: StructureRow("parotid_rt", "Parotid_L", "OAR")},
     "Segments 'Lt Parotid' and 'parotid_rt' are both named 'Parotid_L'"),
    ({3: StructureRow("Cord", "  ", "OAR")}, "Segment 'Cord': enter a structure name or set its role to ignored."),
    ({4: StructureRow("PTV7000", "PTV_70", "OAR")}, "'PTV_70' is named like a target with a prescription"),
    ({0: StructureRow("BODY", "Body", "body")}, "Body segment 'BODY': name it 'External'."),
    ({3: StructureRow("Cord", "SpinalCord", "organ")}, "unknown role 'organ'"),
])
def test_mapping_errors_say_what_to_do(edit, expected):
    rows = structure_rows(CLINICAL_NAMES)
    rows[5].prescriptionGy = 66.0
    for index, row in edit.items():
        rows[index] = row
    check = check_mapping(rows)
    assert not check.ok and any(expected in error for error in check.errors), check.errors
    assert expected.split(":")[0] in check.message()


def test_missing_target_warning_comes_first_and_empty_segmentations_are_errors():
    check = check_mapping(structure_rows(["Brainstem", "External"]), ["Brainstem", "Larynx"])
    assert check.errors == ["Missing required structure: at least one target (PTV) with a prescription. "
                            "Name a segment like PTV_70, or set its role to target and enter the dose."]
    assert check.notes == ["Not in the segmentation (empty model inputs): Larynx."]
    assert "No body (External) segment" in check_mapping(structure_rows(["PTV70"])).notes[-1]
    assert check_mapping([]).errors == ["The segmentation has no segments."]


def test_table_rows_drive_the_case_built_from_nodes(scene, mrml_case):
    """Rows of a segmentation with clinical names -> overrides/prescriptions -> the PlanningCase the model sees."""
    ct_node, seg_node, _ = nodes_from_case(scene, mrml_case)
    segmentation = seg_node.GetSegmentation()
    renames = {"PTV_70": "PTV_High", "Parotid_L": "Lt Parotid", "Larynx": "z_larynx_old"}
    for old, new in renames.items():
        segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(old)).SetName(new)
    logic = DosePreferenceLogic()
    rows = logic.structureRows(seg_node)
    assert [row.segment for row in rows] == [renames.get(name, name) for name in mrml_case.structures]
    check = check_mapping(rows, OPENKBP_OARS)
    assert check.errors == ["Target 'PTV': enter its prescription in Gy."]  # PTV_High says no dose
    assert "Larynx" in check.notes[0]  # z_larynx_old is not recognised: stated, not fatal

    by_segment = {row.segment: row for row in rows}
    by_segment["PTV_High"].canonical, by_segment["PTV_High"].prescriptionGy = "PTV_70", 70.0
    by_segment["z_larynx_old"].role = "ignored"
    assert check_mapping(rows, OPENKBP_OARS).ok
    overrides, prescriptions = mapping_arguments(rows)
    case = case_from_nodes(ct_node, seg_node, overrides=overrides, prescriptions=prescriptions)
    assert set(case.structures) == set(mrml_case.structures) - {"Larynx"}
    assert case.prescriptions == mrml_case.prescriptions
    np.testing.assert_array_equal(case.structures["PTV_70"], mrml_case.structures["PTV_70"])
    assert logic.structureRows(None) == []


CARD = {"name": "m", "inputs": {"channels": ["ct", "target_dose", "Brainstem", "Larynx", "body", "beam_plate"]},
        "preference": {"sliders": ["oar_sparing", "homogeneity"], "range": [-1.0, 1.0],
                       "text": "oar_sparing = w in [-1, 1] asks every OAR's mean dose to change by -20% x w; "
                               "homogeneity = h in [-1, 1] asks that PTV's HI change by -40% x h. "
                               "0 = the typical plan. These are the training targets; see the validation."}}


def test_slider_tooltips_and_model_oars_come_from_the_card():
    tips = slider_tooltips(CARD)
    assert tips["oar_sparing"].startswith("oar_sparing = w in [-1, 1] asks every OAR's mean dose to change by -20% x w.")
    assert "homogeneity = h" not in tips["oar_sparing"] and "-40% x h" in tips["homogeneity"]
    for tip in tips.values():
        assert "0 = the typical plan." in tip and "see the validation." in tip and tip.endswith("Range [-1, 1].")
    assert slider_tooltips(None) == {}  # without a card there are no sliders (the panel says the card is missing)
    assert model_oars(CARD) == ["Brainstem", "Larynx"] and model_oars(None) == []


def test_model_card_is_read_without_loading_the_model(tmp_path):
    import json

    if SHARED_SESSION.predictor is not None:
        pytest.skip("a model is loaded in this session: modelCard() returns its card")
    weights = tmp_path / "m.pt"
    weights.write_bytes(b"")
    weights.with_suffix(".json").write_text(json.dumps(CARD))
    assert DosePreferenceLogic().modelCard(weights) == CARD
    assert DosePreferenceLogic().modelCard(tmp_path / "absent.pt") is None


def test_packages_per_action():
    assert set(TASK_PACKAGES) == {"dvh", "predict", "sample", "export"}
    assert {"torch", "monai"} <= set(TASK_PACKAGES["predict"]) and "pydicom" in TASK_PACKAGES["export"]
    assert set(TASK_PACKAGES["sample"]) == set(TASK_PACKAGES["predict"]) | {"einops"}  # the diffusion model's
    assert missing_packages_for("dvh") == [] and missing_packages_for("export") == []
    assert install_plan([]) == (False, [])
    assert install_plan(["torch>=2.2", "monai>=1.4"]) == (True, ["monai>=1.4"])  # torch first, on its own
    assert install_plan(["torchvision", "monai>=1.4"]) == (False, ["torchvision", "monai>=1.4"])


def test_only_empty_volumes_or_predictions_receive_a_prediction(scene, mrml_case):
    from doseai.errors import DoseAIError

    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    logic = DosePreferenceLogic()
    assert logic.outputProblem(None) == ""
    assert logic.outputProblem(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")) == ""
    assert "'DoseAISample3 CT' holds other data" in logic.outputProblem(ct_node)
    assert "holds other data" in logic.outputProblem(dose_node)  # a clinical dose is never overwritten
    dose_node.SetAttribute("DoseAI.Model", "m")
    assert logic.outputProblem(dose_node) == ""  # an earlier prediction is updated in place
    with pytest.raises(DoseAIError, match="holds other data"):  # refused before any model is loaded
        logic.predict(ct_node, seg_node, doseNode=ct_node)
