"""Dose volume nodes that behave like an RTDOSE imported by SlicerRT's DICOM-RT plugin.

SlicerRT (github.com/SlicerRt/SlicerRT) marks an imported dose in three places, and its Dose Volume Histogram,
Isodose and Dose Accumulation modules read them there:
- the volume node's attribute ``DicomRtImport.DoseVolume`` (``vtkSlicerRtCommon::DICOMRTIMPORT_DOSE_VOLUME_IDENTIFIER_ATTRIBUTE_NAME``);
- the dose unit on the **study** subject-hierarchy item, ``DicomRtImport.DoseUnitName`` and ``DoseUnitValue``
  (``vtkSlicerDicomRtImportExportModuleLogic::LoadRtDose``, ``qSlicerAbstractDoseEngine``); the DVH axis reads the
  name with ``GetAttributeFromItemAncestor(..., GetDICOMLevelStudy())``, the isodose threshold the value;
- its dose colour table ``Dose_ColorTable`` (``vtkSlicerIsodoseModuleLogic::CreateDefaultDoseColorTable``).
"""

from __future__ import annotations

import logging

import numpy as np
import slicer

from doseai.case import validate_dose
from doseai.geometry import ImageGeometry
from doseai.mrml.colors import DOSE_COLOR_TABLE_NAME, dose_rainbow
from doseai.mrml.isodose import ISODOSE_ATTRIBUTE
from doseai.mrml.nodes import set_volume_from_array, subject_hierarchy_item

# attribute names used by SlicerRT (vtkSlicerRtCommon) for dose volumes
DOSE_VOLUME_ATTRIBUTE = "DicomRtImport.DoseVolume"
DOSE_UNIT_NAME_ATTRIBUTE = "DicomRtImport.DoseUnitName"
DOSE_UNIT_VALUE_ATTRIBUTE = "DicomRtImport.DoseUnitValue"

# SlicerRT's dose colour table (vtkSlicerRtCommon::DEFAULT_DOSE_COLOR_TABLE_NAME)
SLICERRT_DOSE_COLOR_TABLE_NAME = "Dose_ColorTable"
DOSE_UNIT_NAME = "GY"  # as SlicerRT copies DICOM's DoseUnits
DOSE_UNIT_VALUE = "1.0"  # SlicerRT stores DoseGridScaling; our voxels are Gy already

logger = logging.getLogger(__name__)

# voxels below this fraction of the maximum dose are transparent in slice views (dose wash)
LOW_DOSE_DISPLAY_FRACTION = 0.05


def is_dose_volume(node) -> bool:
    """True for a volume that carries the RT dose attribute (ours or SlicerRT's)."""
    return node is not None and bool(node.GetAttribute(DOSE_VOLUME_ATTRIBUTE))


def scene_inputs(scene) -> tuple[list, list, list]:
    """What a dose module could take as input from ``scene``, each in scene order: ``(CT candidates,
    segmentations, doses)``. CT candidates are plain scalar volumes not marked as an RT dose (labelmaps
    and other subclasses are left out), segmentations leave out isodose-line displays, doses are the
    volumes marked as an RT dose (see :func:`is_dose_volume`)."""
    cts, doses = [], []
    volumes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    for index in range(volumes.GetNumberOfItems()):
        volume = volumes.GetItemAsObject(index)
        if volume.GetClassName() == "vtkMRMLScalarVolumeNode":
            (doses if is_dose_volume(volume) else cts).append(volume)
    segmentations = []
    nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if not node.GetAttribute(ISODOSE_ATTRIBUTE):
            segmentations.append(node)
    return cts, segmentations, doses


def segment_names(segNode) -> list[str]:
    """The names of a segmentation node's segments, in order ([] for None)."""
    if segNode is None:
        return []
    segmentation = segNode.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def missing_inputs(ctNode, segNode, doseNode, what: str = "dose volume", hint: str = "") -> str:
    """Why a dose module cannot run on these inputs (a sentence for a button's tooltip), or "": a CT, a
    segmentation and a dose (``what``, e.g. "desired dose"; ``hint`` follows its "Select ...") that is
    not the CT itself."""
    if ctNode is None:
        return "Select the CT volume"
    if segNode is None:
        return "Select the segmentation with the structures"
    if doseNode is None:
        return f"Select the {what}{hint}"
    if doseNode is ctNode:
        return f"The {what} must not be the CT volume"
    return ""


def get_or_create_dose_color_table(scene):
    """SlicerRT's dose colour table when SlicerRT is installed (its Isodose logic creates or finds it) or
    the scene has it, so that our doses look like imported ones; otherwise the scene's ``DoseAI_DoseColor``
    table (256 rainbow entries, blue = low dose, red = high), created the first time and shared."""
    slicer_rt = getattr(slicer, "vtkSlicerIsodoseModuleLogic", None)
    if slicer_rt is not None:
        table = slicer_rt.CreateDefaultDoseColorTable(scene)
        if table is not None:
            return table
    for name in (SLICERRT_DOSE_COLOR_TABLE_NAME, DOSE_COLOR_TABLE_NAME):
        existing = scene.GetNodesByClassByName("vtkMRMLColorTableNode", name)
        if existing.GetNumberOfItems() > 0:
            return existing.GetItemAsObject(0)
    color_node = slicer.vtkMRMLColorTableNode()
    color_node.SetName(DOSE_COLOR_TABLE_NAME)
    color_node.SetTypeToUser()
    colors = dose_rainbow(256)
    color_node.SetNumberOfColors(len(colors))
    color_node.GetLookupTable().SetRange(0, len(colors) - 1)
    for index, (r, g, b) in enumerate(colors):
        color_node.SetColor(index, f"{index}", r, g, b, 1.0)
    color_node.SetAttribute("Category", "DoseAI")
    color_node.SetDescription("Dose wash in Gy: each dose volume's window/level maps 0 Gy to blue, its maximum to red")
    scene.AddNode(color_node)
    return color_node


def set_study_dose_unit(sh, dose_item: int) -> bool:
    """The dose unit on the study item above ``dose_item``, as SlicerRT's RTDOSE import puts it (Gy). An
    existing unit is kept (SlicerRT refuses to change it too); one that is not Gy is logged. False when the
    dose sits under no study (SlicerRT's DVH then labels its axis "Dose [?]")."""
    study = sh.GetItemAncestorAtLevel(dose_item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy())
    if not study:
        return False
    unit = sh.GetItemAttribute(study, DOSE_UNIT_NAME_ATTRIBUTE)
    if not unit:
        sh.SetItemAttribute(study, DOSE_UNIT_NAME_ATTRIBUTE, DOSE_UNIT_NAME)
    elif unit.upper() != DOSE_UNIT_NAME:
        logger.warning("The study's dose unit is %s, not Gy: SlicerRT will label this dose (in Gy) %s", unit, unit)
    if not sh.GetItemAttribute(study, DOSE_UNIT_VALUE_ATTRIBUTE):
        sh.SetItemAttribute(study, DOSE_UNIT_VALUE_ATTRIBUTE, DOSE_UNIT_VALUE)
    return True


def _set_dose_display(dose_node, color_node, max_dose_gy: float) -> None:
    if dose_node.GetDisplayNode() is None:
        dose_node.CreateDefaultDisplayNodes()
    display = dose_node.GetDisplayNode()
    was_modifying = display.StartModify()
    display.SetAndObserveColorNodeID(color_node.GetID())
    display.AutoWindowLevelOff()
    top = max(float(max_dose_gy), 1e-3)
    display.SetWindowLevelMinMax(0.0, top)
    display.AutoThresholdOff()
    display.SetLowerThreshold(LOW_DOSE_DISPLAY_FRACTION * top)
    display.SetUpperThreshold(max(top * 10.0, top + 1.0))
    display.ApplyThresholdOn()
    display.EndModify(was_modifying)


def _place_beside(scene, node, ctNode) -> tuple[object, int]:
    """Put ``node`` under the subject hierarchy parent of ``ctNode`` (its study), when it has one; returns
    (the subject hierarchy node, the item of ``node``)."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = subject_hierarchy_item(sh, node)
    if ctNode is not None:
        ct_item = sh.GetItemByDataNode(ctNode)
        parent = sh.GetItemParent(ct_item) if ct_item else 0
        if parent and parent != sh.GetSceneItemID():
            sh.SetItemParent(item, parent)
    return sh, item


def create_or_update_dose_node(
    scene,
    dose: np.ndarray,
    geometry: ImageGeometry,
    name: str,
    ctNode=None,
    node=None,
    display_max_gy: float | None = None,
):
    """A scalar volume node holding ``dose`` (Gy) on ``geometry``, marked as an RT dose.

    ``node`` given: its voxels, geometry and display are updated in place; otherwise a new node is
    added. The node gets the ``DicomRtImport.DoseVolume`` attribute, the shared dose colour table
    with a window/level of 0 Gy .. max dose (or .. ``display_max_gy``: a fixed top keeps the colours
    meaning the same dose while the dose changes), and, when ``ctNode`` sits under a study (or any
    other parent item) in the subject hierarchy, the same parent, with the dose unit on its study (see the
    module docstring). The unit also stays on the node, for a dose outside any study.
    """
    dose = validate_dose(dose)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    set_volume_from_array(node, dose, geometry)
    node.SetAttribute(DOSE_VOLUME_ATTRIBUTE, "1")
    node.SetAttribute(DOSE_UNIT_NAME_ATTRIBUTE, DOSE_UNIT_NAME)
    node.SetAttribute(DOSE_UNIT_VALUE_ATTRIBUTE, DOSE_UNIT_VALUE)
    top = display_max_gy if display_max_gy else float(dose.max(initial=0.0))
    _set_dose_display(node, get_or_create_dose_color_table(scene), top)

    sh, item = _place_beside(scene, node, ctNode)
    set_study_dose_unit(sh, item)
    return node


SPREAD_ATTRIBUTE = "DoseAI.DoseSpread"  # on a spread volume: what it holds ("5-95 %" band width of samples)
SPREAD_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileInferno.txt"  # Slicer's perceptual map; Grey where it is absent


def create_or_update_spread_node(scene, spread: np.ndarray, geometry: ImageGeometry, name: str, ctNode=None,
                                 node=None, band: str = "5-95 %"):
    """A scalar volume node with the voxel-wise spread of sampled doses (Gy: the width of their ``band``),
    beside ``ctNode`` in the subject hierarchy like a dose, but not marked as one (it is not a dose to plan
    with). ``node`` given: updated in place."""
    spread = validate_dose(spread, "dose spread")
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    set_volume_from_array(node, spread, geometry)
    node.SetAttribute(SPREAD_ATTRIBUTE, band)
    node.SetAttribute(DOSE_UNIT_NAME_ATTRIBUTE, DOSE_UNIT_NAME)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    color = scene.GetNodeByID(SPREAD_COLOR_NODE_ID) or scene.GetNodeByID("vtkMRMLColorTableNodeGrey")
    if color is not None:
        display.SetAndObserveColorNodeID(color.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, max(float(np.percentile(spread, 99.5)), 1e-3))
    _place_beside(scene, node, ctNode)
    return node
