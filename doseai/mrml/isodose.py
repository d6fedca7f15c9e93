"""Isodose lines without SlicerRT: a segmentation with one segment per isodose level (dose >= level),
shown as outlines in the slice views, so each outline is the isodose line of its level."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import slicer
import vtk

from doseai.errors import DoseAIError
from doseai.mrml.colors import dose_rainbow
from doseai.mrml.nodes import geometry_from_volume_node, oriented_image, subject_hierarchy_item, volume_array

# percent of the (highest) prescription; a common set in treatment planning systems
DEFAULT_ISODOSE_LEVELS_PCT: tuple[float, ...] = (30.0, 50.0, 70.0, 80.0, 90.0, 95.0, 100.0, 105.0)
ISODOSE_ATTRIBUTE = "DoseAI.Isodose"  # on the segmentation: the ID of the dose volume it outlines
LEVEL_TAG = "DoseAI.IsodosePercent"  # on each segment: its level in percent of the prescription


def isodose_color(percent: float, top_percent: float = 110.0) -> tuple[float, float, float]:
    """The dose colour table's colour at ``percent`` of the prescription (blue low, red high), so
    the lines match the dose wash."""
    colors = dose_rainbow(256)
    index = int(round(np.clip(percent / top_percent, 0.0, 1.0) * (len(colors) - 1)))
    return colors[index]


def parse_levels(text: str) -> tuple[float, ...]:
    """Levels in percent from text like "30, 50, 95 100%": sorted, unique, each in (0, 200]."""
    tokens = [token for token in text.replace("%", " ").replace(",", " ").replace(";", " ").split() if token]
    try:
        levels = sorted({float(token) for token in tokens})
    except ValueError:
        raise DoseAIError(f"isodose levels must be numbers in percent of the prescription, got '{text}'") from None
    if not levels or levels[0] <= 0 or levels[-1] > 200:
        raise DoseAIError(f"give isodose levels between 0 and 200 % of the prescription, got '{text}'")
    return tuple(levels)


def isodose_segmentation(
    dose_node,
    prescription_gy: float,
    levels_pct: Sequence[float] = DEFAULT_ISODOSE_LEVELS_PCT,
    node=None,
    name: str | None = None,
):
    """A segmentation with one segment per level: voxels where the dose is at least ``level`` % of
    ``prescription_gy`` (segment name "95 % (66.5 Gy)"). A level the dose does not reach gives an
    empty segment, so the list of levels stays complete.

    ``node`` given: its segments are replaced. Shown as 2D outlines (no fill, no 3D), placed next to
    the dose in the subject hierarchy.
    """
    if not (np.isfinite(prescription_gy) and prescription_gy > 0):
        raise DoseAIError(f"the prescription for isodose lines must be a positive dose in Gy, got {prescription_gy}")
    scene = dose_node.GetScene()
    dose = volume_array(dose_node)
    geometry = geometry_from_volume_node(dose_node)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{dose_node.GetName()} isodose")
        node.CreateDefaultDisplayNodes()
    was_modifying = node.StartModify()
    node.SetAttribute(ISODOSE_ATTRIBUTE, dose_node.GetID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(dose_node)
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    for percent in sorted(levels_pct):
        level_gy = percent / 100.0 * prescription_gy
        mask = (dose >= level_gy).astype(np.uint8)
        segment_id = node.AddSegmentFromBinaryLabelmapRepresentation(
            oriented_image(mask, geometry), f"{percent:g} % ({level_gy:.1f} Gy)", list(isodose_color(percent)))
        segmentation.GetSegment(segment_id).SetTag(LEVEL_TAG, f"{percent:g}")
    _show_as_lines(node)
    node.EndModify(was_modifying)
    _place_next_to(node, dose_node)
    return node


def show_isodose_lines(dose_node, prescription_gy: float, levels_text: str, node=None, visible: bool = True):
    """The isodose lines of ``dose_node`` at the levels of ``levels_text`` (:func:`parse_levels`; DoseAIError when
    they do not parse) in ``node`` (created when None), shown; with ``visible`` False, ``node`` hidden instead
    (nothing is computed). Returns the node (None when hidden and there was none)."""
    if not visible:
        if node is not None and node.GetDisplayNode():
            node.GetDisplayNode().SetVisibility(False)
        return node
    node = isodose_segmentation(dose_node, prescription_gy, parse_levels(levels_text), node=node)
    node.GetDisplayNode().SetVisibility(True)
    return node


def _show_as_lines(node) -> None:
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    if display is None:
        return
    display.SetVisibility2DFill(False)
    display.SetVisibility2DOutline(True)
    display.SetSliceIntersectionThickness(2)
    display.SetVisibility3D(False)  # 3D surfaces of every level would cost seconds per slider move


def _place_next_to(node, dose_node) -> None:
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    if sh is None:
        return
    dose_item = sh.GetItemByDataNode(dose_node)
    parent = sh.GetItemParent(dose_item) if dose_item else 0
    if parent and parent != sh.GetSceneItemID():
        sh.SetItemParent(subject_hierarchy_item(sh, node), parent)


def isodose_levels(node) -> list[float]:
    """The levels (percent) of an isodose segmentation made by :func:`isodose_segmentation`."""
    segmentation = node.GetSegmentation()
    levels = []
    for index in range(segmentation.GetNumberOfSegments()):
        value = vtk.reference("")
        if segmentation.GetNthSegment(index).GetTag(LEVEL_TAG, value):
            levels.append(float(str(value)))
    return levels
