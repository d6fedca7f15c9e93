"""Volume and segmentation nodes -> :class:`doseai.PlanningCase`, and the conversions both ways share
(grids, voxels, segment labelmaps); the way back, a case added to a scene, is :mod:`doseai.mrml.case_nodes`.

Slicer volume nodes keep voxels in a ``vtkImageData`` (origin 0, spacing 1) and the grid in an
IJK-to-RAS matrix. ``doseai`` grids are ITK/LPS: ``LPS = diag(-1, -1, 1) @ RAS``, so the matrix's
first two rows change sign. Voxel arrays are indexed [k, j, i] (z, y, x) in both.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from doseai.case import PlanningCase, validate_dose
from doseai.errors import GeometryMismatchError, MissingStructureError, UnreadableInputError
from doseai.geometry import ImageGeometry
from doseai.resample import resample_to
from doseai.structures import match_structures

_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


# --- geometry ------------------------------------------------------------------------------------
def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def geometry_from_volume_node(volume_node) -> ImageGeometry:
    """The LPS grid (shape, spacing, origin, direction) of a Slicer volume node.

    A non-zero start of the image extent is folded into the origin, so index [0, 0, 0] of the
    array returned by :func:`volume_array` is at the returned origin.
    """
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        name = volume_node.GetName() if volume_node is not None else "None"
        raise UnreadableInputError(f"volume '{name}' has no voxel data; load or select another volume")
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    matrix = _matrix_to_numpy(ijk_to_ras)
    axes_lps = _RAS_FROM_LPS @ matrix[:3, :3]  # columns: i, j, k steps in LPS mm
    extent_start = np.asarray(image.GetExtent()[0::2], dtype=float)
    origin_lps = _RAS_FROM_LPS @ (matrix[:3, 3] + matrix[:3, :3] @ extent_start)
    spacing = np.linalg.norm(axes_lps, axis=0)
    if np.any(spacing <= 0):
        raise GeometryMismatchError(f"volume '{volume_node.GetName()}' has a degenerate IJK-to-RAS matrix")
    direction = axes_lps / spacing
    nx, ny, nz = image.GetDimensions()
    return ImageGeometry(
        shape=(nz, ny, nx), spacing=tuple(spacing), origin=tuple(origin_lps), direction=tuple(direction.ravel())
    )


def ijk_to_ras_matrix(geometry: ImageGeometry) -> vtk.vtkMatrix4x4:
    """Slicer's IJK-to-RAS matrix of an LPS grid."""
    axes_ras = _RAS_FROM_LPS @ (geometry.direction_matrix * np.asarray(geometry.spacing)[None, :])
    origin_ras = _RAS_FROM_LPS @ np.asarray(geometry.origin)
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(axes_ras[r, c]))
        matrix.SetElement(r, 3, float(origin_ras[r]))
    return matrix


# --- voxels --------------------------------------------------------------------------------------
def volume_array(volume_node) -> np.ndarray:
    """A copy of the node's voxels as a numpy array indexed [k, j, i]."""
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise UnreadableInputError(f"volume '{volume_node.GetName()}' has no voxel data")
    if image.GetNumberOfScalarComponents() != 1:
        raise UnreadableInputError(
            f"volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel; "
            "a scalar volume is needed"
        )
    nx, ny, nz = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nz, ny, nx).copy()


def _image_data(array: np.ndarray, image=None):
    array = np.ascontiguousarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    nz, ny, nx = array.shape
    image = image if image is not None else vtk.vtkImageData()
    image.SetDimensions(nx, ny, nz)
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    return image


def oriented_image(mask: np.ndarray, geometry: ImageGeometry):
    """A ``vtkOrientedImageData`` of ``mask`` (indexed [k, j, i], stored as uint8) placed on ``geometry``:
    the binary labelmap a segment is added from (``AddSegmentFromBinaryLabelmapRepresentation``)."""
    image = _image_data(np.asarray(mask, dtype=np.uint8), slicer.vtkOrientedImageData())
    image.SetImageToWorldMatrix(ijk_to_ras_matrix(geometry))
    return image


def set_volume_from_array(volume_node, array: np.ndarray, geometry: ImageGeometry) -> None:
    """Put ``array`` (shape == geometry.shape, indexed [k, j, i]) into ``volume_node`` on ``geometry``."""
    array = np.asarray(array)
    if tuple(array.shape) != geometry.shape:
        raise GeometryMismatchError(f"array shape {array.shape} does not match grid shape {geometry.shape}")
    was_modifying = volume_node.StartModify()
    volume_node.SetIJKToRASMatrix(ijk_to_ras_matrix(geometry))
    volume_node.SetAndObserveImageData(_image_data(array))
    volume_node.EndModify(was_modifying)


def _require_untransformed(node, what: str) -> None:
    if node.GetParentTransformNode() is not None:
        raise GeometryMismatchError(
            f"the {what} '{node.GetName()}' is under transform '{node.GetParentTransformNode().GetName()}'; "
            "harden the transform (Data module: right-click > Harden transform) and try again"
        )


# --- segmentation -> masks -----------------------------------------------------------------------
def _ensure_binary_labelmaps(segmentation_node, reference_volume_node) -> None:
    segmentation = segmentation_node.GetSegmentation()
    binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if segmentation.ContainsRepresentation(binary):
        return
    # contours/surfaces only (e.g. an RTSTRUCT): rasterize on the CT grid unless a geometry was chosen
    geometry_parameter = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    if not segmentation.GetConversionParameter(geometry_parameter):
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    if not segmentation_node.CreateBinaryLabelmapRepresentation():
        raise UnreadableInputError(
            f"segmentation '{segmentation_node.GetName()}' could not be converted to binary labelmaps; "
            "convert it in the Segmentations module (Representations > Binary labelmap > Create)"
        )


def segment_masks_on_volume(segmentation_node, reference_volume_node) -> dict[str, np.ndarray]:
    """Each segment of ``segmentation_node`` as a bool mask on the grid of ``reference_volume_node``,
    keyed by segment name. Segments are exported one at a time (they may overlap), through a
    temporary labelmap node that is removed again with the nodes the export adds."""
    scene = segmentation_node.GetScene()
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        raise MissingStructureError(f"segmentation '{segmentation_node.GetName()}' has no segments")
    _ensure_binary_labelmaps(segmentation_node, reference_volume_node)
    shape = geometry_from_volume_node(reference_volume_node).shape
    logic = slicer.vtkSlicerSegmentationsModuleLogic

    existing = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__DoseAI_temporary_labelmap__")
    labelmap.SetHideFromEditors(True)
    segment_ids = vtk.vtkStringArray()
    masks: dict[str, np.ndarray] = {}
    try:
        for index in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(index)
            name = segmentation.GetSegment(segment_id).GetName()
            if name in masks:
                raise MissingStructureError(
                    f"segmentation '{segmentation_node.GetName()}' has two segments named '{name}'; rename one"
                )
            segment_ids.Reset()
            segment_ids.InsertNextValue(segment_id)
            if not logic.ExportSegmentsToLabelmapNode(
                segmentation_node, segment_ids, labelmap, reference_volume_node,
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
            ):
                raise UnreadableInputError(f"segment '{name}' could not be exported as a labelmap")
            mask = volume_array(labelmap) > 0
            if mask.shape != shape:
                raise GeometryMismatchError(f"segment '{name}' exported with shape {mask.shape}, expected {shape}")
            masks[name] = mask
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in existing:
                scene.RemoveNode(node)
    return masks


def segment_colors(segmentation_node, overrides: Mapping[str, str | None] | None = None) -> dict[str, tuple]:
    """Segment colours keyed by the names a PlanningCase built from this segmentation uses."""
    segmentation = segmentation_node.GetSegmentation()
    raw = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        raw[segment.GetName()] = tuple(segment.GetColor())
    mapping = match_structures(raw.keys(), overrides)
    return {mapping[name]: color for name, color in raw.items() if name in mapping}


def subject_hierarchy_item(sh, node) -> int:
    """The subject hierarchy item of ``node``, created under the scene when there is none (in the
    Slicer application the Qt plugin logic adds items for new nodes; on slicer-core nothing does)."""
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(sh.GetSceneItemID(), node)
    return item


def _patient_name(node) -> str | None:
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    if sh is None:
        return None
    item = sh.GetItemByDataNode(node)
    scene_item = sh.GetSceneItemID()
    while item and item != scene_item:
        if sh.GetItemLevel(item) == slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelPatient():
            return sh.GetItemAttribute(item, "DICOM.PatientID") or sh.GetItemName(item)
        item = sh.GetItemParent(item)
    return None


def dose_on_grid(doseNode, geometry: ImageGeometry, what: str = "dose volume") -> np.ndarray:
    """The voxels of a dose volume (Gy, float32) on ``geometry``: as they are when the grids match,
    else resampled (linear; the overshoot below 0 clipped). Raises when the node is under a transform
    or holds NaN or negative doses (``what`` names it in the message)."""
    _require_untransformed(doseNode, what)
    dose_geometry = geometry_from_volume_node(doseNode)
    dose = volume_array(doseNode).astype(np.float32)
    if not dose_geometry.matches(geometry):
        dose = resample_to(dose, dose_geometry, geometry).clip(0.0, None)
    return validate_dose(dose, f"{what} '{doseNode.GetName()}'")


def case_from_nodes(
    ctNode,
    segNode,
    doseNode=None,
    overrides: Mapping[str, str | None] | None = None,
    prescriptions: Mapping[str, float] | None = None,
) -> PlanningCase:
    """A :class:`PlanningCase` on the CT grid from a CT volume, a segmentation and optionally a dose volume.

    Segments are rasterized on the CT grid and their names matched to canonical ones
    (``overrides`` maps raw segment names to canonical names, or to None to leave a segment out);
    target prescriptions come from names like ``PTV70`` unless given in ``prescriptions``.
    A dose volume on another grid is resampled onto the CT grid (linear interpolation).
    """
    if ctNode is None or segNode is None:
        raise MissingStructureError("select a CT volume and a segmentation")
    _require_untransformed(ctNode, "CT volume")
    geometry = geometry_from_volume_node(ctNode)
    ct = volume_array(ctNode).astype(np.float32)
    masks = segment_masks_on_volume(segNode, ctNode)
    dose = None
    metadata = {"ct_node_id": ctNode.GetID(), "segmentation_node_id": segNode.GetID()}
    if doseNode is not None:
        dose = dose_on_grid(doseNode, geometry)
        if not geometry_from_volume_node(doseNode).matches(geometry):
            metadata["dose_resampled"] = "1"
        metadata["dose_node_id"] = doseNode.GetID()
    return PlanningCase.from_named_masks(
        geometry, masks, ct=ct, dose=dose, overrides=overrides, prescriptions=prescriptions,
        patient_id=_patient_name(ctNode) or "anonymous", metadata=metadata,
    )
