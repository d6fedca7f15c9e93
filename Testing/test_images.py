import numpy as np
import pytest

from doseai import GeometryMismatchError, OutputExistsError, UnreadableInputError
from doseai.io import images, load_case, save_case


@pytest.mark.parametrize("fmt", ["nrrd", "nifti", "mha"])
def test_image_case_roundtrip(small_case, tmp_path, fmt):
    folder = save_case(small_case, tmp_path / fmt, fmt)
    back = load_case(folder)
    assert back.geometry.matches(small_case.geometry)
    assert back.patient_id == small_case.patient_id and back.prescriptions == small_case.prescriptions
    assert np.abs(back.ct - np.round(small_case.ct)).max() <= 1  # CT stored as int16 HU
    assert np.allclose(back.dose, small_case.dose, atol=1e-5)
    if fmt == "nrrd":  # .seg.nrrd keeps overlapping structures on separate layers
        for name, mask in small_case.structures.items():
            assert np.array_equal(back.structures[name], mask), name
    else:  # a single labelmap: the last-written structure wins where they overlap
        assert set(back.structures) == set(small_case.structures)
        assert np.array_equal(back.structures["PTV_70"], small_case.structures["PTV_70"])


def test_seg_nrrd_keeps_oblique_geometry(small_case, tmp_path):
    from doseai.geometry import ImageGeometry

    geometry = ImageGeometry(small_case.geometry.shape, small_case.geometry.spacing, origin=(5, -7, 11),
                             direction=(0, -1, 0, 1, 0, 0, 0, 0, 1))
    images.write_seg_nrrd({"PTV_70": small_case.structures["PTV_70"]}, geometry, tmp_path / "s.seg.nrrd")
    masks, back = images.read_labelmap(tmp_path / "s.seg.nrrd")
    assert back.matches(geometry) and np.array_equal(masks["PTV_70"], small_case.structures["PTV_70"])


def test_seg_nrrd_loads_in_slicer(small_case, tmp_path):
    slicer = pytest.importorskip("slicer", reason="slicer-core not installed")
    path = images.write_seg_nrrd(small_case.structures, small_case.geometry, tmp_path / "s.seg.nrrd")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    segmentation = node.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == list(small_case.structures)


def test_labelmap_with_names(small_case, tmp_path):
    masks = {"PTV70": small_case.structures["PTV_70"], "Cord": small_case.structures["SpinalCord"]}
    labels = images.write_labelmap(masks, small_case.geometry, tmp_path / "labels.nii.gz")
    read, _ = images.read_labelmap(tmp_path / "labels.nii.gz", labels)
    assert set(read) == {"PTV70", "Cord"} and np.array_equal(read["Cord"], masks["Cord"])
    unnamed, _ = images.read_labelmap(tmp_path / "labels.nii.gz")
    assert set(unnamed) == {"Label_1", "Label_2"}


def test_image_errors(small_case, tmp_path):
    with pytest.raises(UnreadableInputError, match="no such file"):
        images.read_image(tmp_path / "missing.nrrd")
    (tmp_path / "junk.nrrd").write_bytes(b"not an image at all")
    with pytest.raises(UnreadableInputError, match="not a readable image"):
        images.read_image(tmp_path / "junk.nrrd")
    images.write_image(small_case.dose, small_case.geometry, tmp_path / "dose.nrrd")
    with pytest.raises(OutputExistsError):
        images.write_image(small_case.dose, small_case.geometry, tmp_path / "dose.nrrd")
    folder = save_case(small_case, tmp_path / "case", "nrrd")
    from doseai.geometry import ImageGeometry

    shifted = ImageGeometry(small_case.geometry.shape, small_case.geometry.spacing, origin=(1.0, 0.0, 0.0))
    images.write_image(small_case.dose, shifted, folder / "dose.nrrd", force=True)
    with pytest.raises(GeometryMismatchError, match="different grid"):
        load_case(folder)
