"""A :class:`doseai.PlanningCase` added to a scene: CT, structures and dose as nodes under a patient and study.

The inverse of :func:`doseai.mrml.nodes.case_from_nodes`. It lives apart from :mod:`doseai.mrml.nodes`
because it makes a dose node (:mod:`doseai.mrml.dose`), which itself builds on ``nodes``: imports run one way.
"""

from __future__ import annotations

import numpy as np
import slicer

from doseai.case import PlanningCase
from doseai.mrml.colors import structure_color
from doseai.mrml.dose import create_or_update_dose_node
from doseai.mrml.nodes import oriented_image, set_volume_from_array, subject_hierarchy_item


def nodes_from_case(scene, case: PlanningCase, name: str | None = None):
    """Add ``case`` to ``scene``: a CT volume, a segmentation with one segment per structure (with
    colours) and, when the case has a dose, a dose volume (see :func:`create_or_update_dose_node`),
    all under a patient and study in the subject hierarchy. Returns ``(ctNode, segNode, doseNode|None)``."""
    prefix = name or case.patient_id
    ct = case.ct if case.ct is not None else np.full(case.geometry.shape, -1000.0, dtype=np.float32)
    ct_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{prefix} CT")
    set_volume_from_array(ct_node, ct, case.geometry)
    ct_node.CreateDefaultDisplayNodes()
    ct_display = ct_node.GetDisplayNode()
    if ct_display is not None:
        ct_display.AutoWindowLevelOff()
        ct_display.SetWindowLevel(400.0, 40.0)  # soft tissue

    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{prefix} structures")
    seg_node.CreateDefaultDisplayNodes()
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    for structure, mask in case.structures.items():
        seg_node.AddSegmentFromBinaryLabelmapRepresentation(
            oriented_image(mask, case.geometry), structure, list(structure_color(structure))
        )

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), case.patient_id)
    sh.SetItemAttribute(patient, "DICOM.PatientID", case.patient_id)
    study = sh.CreateStudyItem(patient, case.metadata.get("study_description", "DoseAI study"))
    for node in (ct_node, seg_node):
        sh.SetItemParent(subject_hierarchy_item(sh, node), study)

    dose_node = None
    if case.dose is not None:
        dose_node = create_or_update_dose_node(scene, case.dose, case.geometry, f"{prefix} dose", ctNode=ct_node)
    return ct_node, seg_node, dose_node
