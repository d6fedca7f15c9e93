"""Our dose nodes as SlicerRT treats an imported RTDOSE, checked against the attribute names and the logic
SlicerRT itself uses (github.com/SlicerRt/SlicerRT):

- DicomRtImportExport/Logic/vtkSlicerDicomRtImportExportModuleLogic.cxx, ``LoadRtDose``: the dose unit goes on
  the *study* item (``DicomRtImport.DoseUnitName`` = the RTDOSE's DoseUnits, ``DicomRtImport.DoseUnitValue`` =
  its DoseGridScaling), and a unit already there is kept; ``InsertSeriesInSubjectHierarchy``: an RT series keeps
  its SOP Instance UID as the item's ``DICOMInstanceUID`` (the RTSTRUCT's segmentation gets no node attribute).
- DoseVolumeHistogram/Logic/vtkSlicerDoseVolumeHistogramModuleLogic.cxx: the DVH axis reads the unit with
  ``GetAttributeFromItemAncestor(doseItem, "DicomRtImport.DoseUnitName", GetDICOMLevelStudy())``.
- Isodose/Logic/vtkSlicerIsodoseModuleLogic.cxx, ``CreateDefaultDoseColorTable``: the table named
  ``Dose_ColorTable`` (vtkSlicerRtCommon::DEFAULT_DOSE_COLOR_TABLE_NAME), found in the scene or created.
"""

from __future__ import annotations

import types

import pytest
import slicer
from DosePreferenceLib import dicom_reference

from doseai.mrml import DOSE_COLOR_TABLE_NAME, create_or_update_dose_node, nodes_from_case

pytestmark = pytest.mark.mrml

UNIT_NAME, UNIT_VALUE = "DicomRtImport.DoseUnitName", "DicomRtImport.DoseUnitValue"  # vtkSlicerRtCommon.cxx
STUDY = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy()


def _dvh_axis_unit(scene, dose_node) -> str:
    """What SlicerRT's DVH logic puts in its axis title: "Dose [<unit>]", "?" when there is none."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    unit = sh.GetAttributeFromItemAncestor(sh.GetItemByDataNode(dose_node), UNIT_NAME, STUDY)
    return unit or "?"


def test_the_dose_unit_sits_on_the_study_where_slicerrt_reads_it(scene, mrml_case):
    ct_node, _, _ = nodes_from_case(scene, mrml_case)
    dose = create_or_update_dose_node(scene, mrml_case.dose, mrml_case.geometry, "predicted", ctNode=ct_node)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.GetItemAncestorAtLevel(sh.GetItemByDataNode(dose), STUDY)
    assert study and study == sh.GetItemParent(sh.GetItemByDataNode(ct_node))
    assert (sh.GetItemAttribute(study, UNIT_NAME), sh.GetItemAttribute(study, UNIT_VALUE)) == ("GY", "1.0")
    assert _dvh_axis_unit(scene, dose) == "GY"


def test_a_unit_an_imported_rtdose_put_on_the_study_is_kept(scene, mrml_case):
    ct_node, _, _ = nodes_from_case(scene, mrml_case)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.GetItemParent(sh.GetItemByDataNode(ct_node))
    sh.SetItemAttribute(study, UNIT_NAME, "GY")
    sh.SetItemAttribute(study, UNIT_VALUE, "4.4812099e-5")  # a TPS's DoseGridScaling, as SlicerRT stored it
    create_or_update_dose_node(scene, mrml_case.dose, mrml_case.geometry, "predicted", ctNode=ct_node)
    assert sh.GetItemAttribute(study, UNIT_VALUE) == "4.4812099e-5"


def test_a_dose_outside_any_study_keeps_its_unit_on_the_node(scene, mrml_case):
    plain_ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "plain CT")
    dose = create_or_update_dose_node(scene, mrml_case.dose, mrml_case.geometry, "dose", ctNode=plain_ct)
    assert dose.GetAttribute(UNIT_NAME) == "GY" and _dvh_axis_unit(scene, dose) == "?"


def test_slicerrt_dose_color_table_is_used_when_present(scene, mrml_case, monkeypatch):
    ct_node, _, _ = nodes_from_case(scene, mrml_case)
    ours = create_or_update_dose_node(scene, mrml_case.dose, mrml_case.geometry, "a", ctNode=ct_node)
    assert ours.GetDisplayNode().GetColorNode().GetName() == DOSE_COLOR_TABLE_NAME  # no SlicerRT

    # SlicerRT installed: its Isodose logic finds or creates Dose_ColorTable (stand-in for the C++ static)
    table = slicer.vtkMRMLColorTableNode()
    table.SetName("Dose_ColorTable")
    table.SetTypeToRainbow()
    created = []

    def create_default_dose_color_table(the_scene):
        if not created:
            the_scene.AddNode(table)
        created.append(the_scene)
        return table

    monkeypatch.setattr(slicer, "vtkSlicerIsodoseModuleLogic",
                        types.SimpleNamespace(CreateDefaultDoseColorTable=create_default_dose_color_table),
                        raising=False)
    theirs = create_or_update_dose_node(scene, mrml_case.dose, mrml_case.geometry, "b", ctNode=ct_node)
    assert created == [scene] and theirs.GetDisplayNode().GetColorNodeID() == table.GetID()

    # SlicerRT's table already in the scene (a scene saved with SlicerRT, opened without it): used too
    monkeypatch.delattr(slicer, "vtkSlicerIsodoseModuleLogic")
    again = create_or_update_dose_node(scene, mrml_case.dose, mrml_case.geometry, "c", ctNode=ct_node)
    assert again.GetDisplayNode().GetColorNodeID() == table.GetID()


def test_the_rtstruct_uid_comes_from_the_subject_hierarchy_as_slicerrt_keeps_it(scene, mrml_case):
    ct_node, seg_node, _ = nodes_from_case(scene, mrml_case)
    ct_node.SetAttribute("DICOM.instanceUIDs", "1.2.3.4.100 1.2.3.4.101")  # Slicer's scalar volume plugin
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    seg_item = sh.GetItemByDataNode(seg_node) or sh.CreateItem(sh.GetSceneItemID(), seg_node)
    assert "RTStructSOPInstanceUID" not in dicom_reference(ct_node, lambda uid, tag: "x", seg_node)
    sh.SetItemUID(seg_item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMInstanceUIDName(), "1.2.3.4.300")
    assert seg_node.GetAttribute("DICOM.instanceUIDs") is None  # SlicerRT sets no node attribute
    assert dicom_reference(ct_node, lambda uid, tag: "x", seg_node)["RTStructSOPInstanceUID"] == "1.2.3.4.300"
