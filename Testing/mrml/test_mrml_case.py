"""PlanningCase <-> MRML nodes: geometry (RAS <-> LPS), masks, CT and dose voxels."""

from __future__ import annotations

import numpy as np
import pytest

from doseai.case import PlanningCase
from doseai.errors import GeometryMismatchError, MissingStructureError
from doseai.geometry import ImageGeometry
from doseai.mrml import (
    case_from_nodes,
    geometry_from_volume_node,
    ijk_to_ras_matrix,
    nodes_from_case,
    segment_colors,
    set_volume_from_array,
    structure_color,
    volume_array,
)

pytestmark = pytest.mark.mrml


def _rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])


def test_round_trip_masks_geometry_ct_dose(scene, mrml_case, dice):
    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    node_count = scene.GetNumberOfNodes()
    back = case_from_nodes(ct_node, seg_node, dose_node)
    assert scene.GetNumberOfNodes() == node_count  # the temporary labelmap export leaves nothing behind

    assert back.geometry.shape == mrml_case.geometry.shape
    np.testing.assert_allclose(back.geometry.spacing, mrml_case.geometry.spacing, atol=1e-6)
    np.testing.assert_allclose(back.geometry.origin, mrml_case.geometry.origin, atol=1e-6)
    np.testing.assert_allclose(back.geometry.direction, mrml_case.geometry.direction, atol=1e-9)
    assert set(back.structures) == set(mrml_case.structures)
    for name, mask in mrml_case.structures.items():
        assert dice(back.structures[name], mask) >= 0.99, name
    np.testing.assert_allclose(back.ct, mrml_case.ct)
    np.testing.assert_allclose(back.dose, mrml_case.dose, atol=1e-6)
    assert back.prescriptions == mrml_case.prescriptions  # read from the PTV segment names
    assert back.patient_id == mrml_case.patient_id  # from the subject hierarchy patient item
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    assert not scene.GetNodesByName(f"{seg_node.GetName()}_ColorTable").GetNumberOfItems()


def test_slicer_sees_lps_as_ras(scene):
    """Index -> physical point agrees between doseai (LPS) and Slicer's IJK-to-RAS matrix, oblique grid
    included; the case's structures are where Slicer puts them."""
    direction = _rotation_z(30.0) @ np.diag([1.0, -1.0, 1.0])
    geometry = ImageGeometry(shape=(5, 7, 9), spacing=(1.5, 2.0, 3.0), origin=(10.0, -20.0, 30.0),
                             direction=tuple(direction.ravel()))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    array = np.arange(np.prod(geometry.shape), dtype=np.float32).reshape(geometry.shape)
    set_volume_from_array(node, array, geometry)

    back = geometry_from_volume_node(node)
    assert back.matches(geometry, tolerance_mm=1e-9)
    np.testing.assert_allclose(back.direction, geometry.direction, atol=1e-12)
    np.testing.assert_array_equal(volume_array(node), array)

    import vtk

    vtk_matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(vtk_matrix)  # what Slicer uses to place the voxels
    matrix = np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    ours = ijk_to_ras_matrix(geometry)
    np.testing.assert_allclose(matrix, [[ours.GetElement(r, c) for c in range(4)] for r in range(4)], atol=1e-12)
    index_kji = np.array([[0, 0, 0], [4, 6, 8], [1, 2, 3]])
    lps = geometry.index_to_physical(index_kji)
    ras = (matrix @ np.c_[index_kji[:, ::-1], np.ones(3)].T).T[:, :3]
    np.testing.assert_allclose(ras, lps * np.array([-1.0, -1.0, 1.0]), atol=1e-9)


def test_oblique_case_round_trip(scene, dice):
    direction = _rotation_z(-20.0)
    geometry = ImageGeometry(shape=(12, 20, 24), spacing=(2.0, 2.5, 3.0), origin=(-5.0, 12.0, 40.0),
                             direction=tuple(direction.ravel()))
    zz, yy, xx = np.indices(geometry.shape)
    masks = {"PTV_60": (abs(zz - 6) < 3) & (abs(yy - 10) < 4) & (abs(xx - 12) < 5), "Cord": xx < 4}
    case = PlanningCase.from_named_masks(geometry, masks, ct=np.zeros(geometry.shape, np.float32))
    ct_node, seg_node, dose_node = nodes_from_case(scene, case)
    assert dose_node is None
    back = case_from_nodes(ct_node, seg_node)
    assert back.geometry.matches(geometry, tolerance_mm=1e-6)
    assert set(back.structures) == {"PTV_60", "SpinalCord"}
    for name in back.structures:
        assert dice(back.structures[name], case.structures[name]) >= 0.99
    assert back.dose is None


def test_dose_on_other_grid_is_resampled_to_ct(scene, mrml_case):
    ct_node, seg_node, _ = nodes_from_case(scene, mrml_case)
    # a linear ramp along x on a coarser, shifted grid: linear resampling reproduces it inside
    g = mrml_case.geometry
    dose_geometry = ImageGeometry(shape=(g.shape[0] // 2, g.shape[1] // 2, g.shape[2] // 2),
                                  spacing=tuple(2 * s for s in g.spacing),
                                  origin=tuple(o + 0.5 * s for o, s in zip(g.origin, g.spacing)))
    x_dose = dose_geometry.index_to_physical(np.c_[np.zeros(dose_geometry.shape[2]), np.zeros(dose_geometry.shape[2]),
                                                   np.arange(dose_geometry.shape[2])])[:, 0]
    ramp = np.broadcast_to((x_dose - x_dose.min()) * 0.2, dose_geometry.shape).astype(np.float32)
    dose_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "coarse dose")
    set_volume_from_array(dose_node, ramp, dose_geometry)

    case = case_from_nodes(ct_node, seg_node, dose_node)
    assert case.dose.shape == g.shape
    assert case.metadata["dose_resampled"] == "1"
    x_ct = g.index_to_physical(np.c_[np.zeros(g.shape[2]), np.zeros(g.shape[2]), np.arange(g.shape[2])])[:, 0]
    inside = (x_ct >= x_dose.min()) & (x_ct <= x_dose.max())
    expected = (x_ct[inside] - x_dose.min()) * 0.2
    zc, yc = g.shape[0] // 2, g.shape[1] // 2
    np.testing.assert_allclose(case.dose[zc, yc, inside], expected, atol=1e-3)


def test_overrides_prescriptions_and_colors(scene, mrml_case):
    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    case = case_from_nodes(ct_node, seg_node, dose_node, overrides={"External": None, "Larynx": "Glottis"},
                           prescriptions={"PTV_70": 66.0})
    assert "External" not in case.structures
    assert "Glottis" in case.structures and "Larynx" not in case.structures
    assert case.prescriptions["PTV_70"] == 66.0 and case.prescriptions["PTV_56"] == 56.0
    colors = segment_colors(seg_node, {"Larynx": "Glottis"})
    np.testing.assert_allclose(colors["SpinalCord"], structure_color("SpinalCord"))
    assert "Glottis" in colors


def test_raw_segment_names_are_matched(scene, mrml_case, dice):
    ct_node, seg_node, _ = nodes_from_case(scene, mrml_case)
    segmentation = seg_node.GetSegmentation()
    renames = {"Parotid_L": "Lt Parotid", "SpinalCord": "Cord", "PTV_70": "PTV7000"}
    for canonical, raw in renames.items():
        segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(canonical)).SetName(raw)
    case = case_from_nodes(ct_node, seg_node)
    for canonical in renames:
        assert dice(case.structures[canonical], mrml_case.structures[canonical]) >= 0.99
    assert case.prescriptions["PTV_70"] == 70.0


def test_surface_only_segmentation_is_rasterized_on_ct(scene, mrml_case, dice):
    """A segmentation holding only closed surfaces (as after RTSTRUCT import) is converted on the CT grid."""
    import slicer

    ct_node, seg_node, _ = nodes_from_case(scene, mrml_case)
    surface = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    assert seg_node.CreateClosedSurfaceRepresentation()
    seg_node.GetSegmentation().SetSourceRepresentationName(surface)
    seg_node.RemoveBinaryLabelmapRepresentation()
    seg_node.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), "")
    binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    assert not seg_node.GetSegmentation().ContainsRepresentation(binary)

    case = case_from_nodes(ct_node, seg_node)
    for name in ("External", "Mandible", "PTV_70"):
        assert dice(case.structures[name], mrml_case.structures[name]) >= 0.9, name  # surfaces are smoothed


def test_errors_say_what_to_do(scene, mrml_case):
    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    ct_node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(GeometryMismatchError, match="harden"):
        case_from_nodes(ct_node, seg_node, dose_node)
    ct_node.SetAndObserveTransformNodeID(None)

    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    with pytest.raises(MissingStructureError, match="no segments"):
        case_from_nodes(ct_node, empty)
    with pytest.raises(MissingStructureError):
        case_from_nodes(ct_node, None)


def test_segmentation_transform_is_applied(scene, mrml_case):
    """A segmentation under a linear transform is rasterized where Slicer shows it (the CT must not be
    transformed, the segmentation may be)."""
    import vtk

    ct_node, seg_node, dose_node = nodes_from_case(scene, mrml_case)
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, -3 * mrml_case.geometry.spacing[0])  # 3 voxels to the left: -x in RAS, +x in LPS
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    transform.SetMatrixTransformToParent(shift)
    seg_node.SetAndObserveTransformNodeID(transform.GetID())
    case = case_from_nodes(ct_node, seg_node, dose_node)
    expected = np.roll(mrml_case.structures["PTV_70"], 3, axis=2)  # the PTV is far from the grid edge
    np.testing.assert_array_equal(case.structures["PTV_70"], expected)
