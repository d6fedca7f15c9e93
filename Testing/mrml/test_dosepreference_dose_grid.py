"""The predicted dose on a grid of its own (doseai.dose_grid) on slicer-core: on a CT finer than 2.5 mm the dose
node lies on the CT's voxels binned per block (aligned with the CT, over the body), its DVH weighs partial volumes,
and the exported RTDOSE, read back by Slicer's own volume reader (ITK/GDCM) with DoseGridScaling applied as
SlicerRT's DICOM-RT import does, lies on the same grid over the CT and within 0.01 Gy of the dose node."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="torch not installed (pip install -e '.[models]')")
pydicom = pytest.importorskip("pydicom")

from DosePreferenceLib import DosePreferenceLogic  # noqa: E402

from doseai.dose_grid import on_dose_grid  # noqa: E402
from doseai.mrml import geometry_from_volume_node, nodes_from_case, volume_array  # noqa: E402

pytestmark = pytest.mark.mrml


def _read_like_slicer(scene, path):
    """The RTDOSE file as Slicer's volume reader gives it, its stored values times DoseGridScaling (what
    SlicerRT's DicomRtImport applies; the plain reader keeps the stored integers)."""
    from slicer import vtkMRMLVolumeArchetypeStorageNode

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "read back")
    storage = vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)
    assert storage.ReadData(node) == 1
    scaling = float(pydicom.dcmread(path, stop_before_pixels=True).DoseGridScaling)
    return node, volume_array(node).astype(np.float64) * scaling


def test_the_dose_lies_on_its_own_grid_and_exports_as_such(scene, fine_case, tmp_path):
    ct_node, seg_node, _ = nodes_from_case(scene, fine_case)
    logic = DosePreferenceLogic()
    result = logic.predict(ct_node, seg_node, oarSparing=0.4)
    dose_node = result.doseNode
    ct_geometry, dose_geometry = geometry_from_volume_node(ct_node), geometry_from_volume_node(dose_node)
    expected = on_dose_grid(fine_case).geometry
    assert dose_geometry.matches(expected) and not dose_geometry.matches(ct_geometry)
    assert dose_geometry.spacing == pytest.approx((2.6, 2.6, 2.5))
    assert dose_geometry.direction == ct_geometry.direction
    # the dose voxel's corner lies on a CT voxel's corner (it bins whole CT voxels)
    corner_ct_index = ct_geometry.physical_to_index(np.array([dose_geometry.origin]))[0] - np.array([0.5, 0.5, 0.5])
    np.testing.assert_allclose(corner_ct_index, np.round(corner_ct_index), atol=1e-6)
    dose = volume_array(dose_node)
    assert dose.max() > 0.8 * 70

    paths = logic.exportResults(ct_node, seg_node, dose_node, tmp_path)
    read_node, read_dose = _read_like_slicer(scene, paths["rtdose"])
    assert geometry_from_volume_node(read_node).matches(dose_geometry)  # over the CT where the dose node is
    assert np.abs(read_dose - dose).max() <= 0.01

    # the DVH of the read-back dose, as a user computes it for an imported RTDOSE: the prediction's metrics
    read_node.SetAttribute("DicomRtImport.DoseVolume", "1")
    from doseai.mrml import set_volume_from_array

    set_volume_from_array(read_node, read_dose.astype(np.float32), geometry_from_volume_node(read_node))
    again = logic.computeDVH(ct_node, seg_node, read_node)
    for name in ("PTV_70", "Parotid_L", "SpinalCord"):
        for metric in ("D95", "Dmean"):
            assert again.metrics[name][metric] == pytest.approx(result.dvh.metrics[name][metric], abs=0.01)


def test_the_ct_grid_stays_available(scene, fine_case):
    ct_node, seg_node, _ = nodes_from_case(scene, fine_case)
    logic = DosePreferenceLogic()
    logic.doseGridMm = None
    dose_node = logic.predict(ct_node, seg_node).doseNode
    assert geometry_from_volume_node(dose_node).matches(geometry_from_volume_node(ct_node))
