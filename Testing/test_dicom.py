"""DICOM-RT IO: CT series, RTSTRUCT, RTDOSE and whole cases, written and read back (no data downloaded)."""

from __future__ import annotations

import os
from pathlib import Path
import warnings

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from doseai.case import PlanningCase
from doseai.errors import (
    GeometryMismatchError,
    InvalidDoseError,
    OutputExistsError,
    UnreadableInputError,
)
from doseai.geometry import ImageGeometry
from doseai.io import dicom
from doseai.io.dicom import ct as dicom_ct
from doseai.io.dicom.writing import save_dataset
from doseai.sample import make_sample_case

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

# right-handed directions (row x column = slice axis), as DICOM stores them
ORIENTATIONS = {
    "x_and_y_flipped": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
    "feet_first": (-1, 0, 0, 0, 1, 0, 0, 0, -1),
    "oblique": tuple(Rotation.from_euler("zx", [30, 20], degrees=True).as_matrix().ravel()),
}


@pytest.fixture(scope="module")
def case() -> PlanningCase:
    return make_sample_case(seed=1, shape=(24, 48, 48), spacing_xyz=(4.0, 4.0, 3.0))


def _regrid(geometry: ImageGeometry, direction) -> ImageGeometry:
    return ImageGeometry(geometry.shape, geometry.spacing, (12.5, -40.0, 101.0), direction)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


def _small_masks(shape=(6, 40, 40)) -> dict[str, np.ndarray]:
    """A ring (hole inside), two blobs on one slice, a one-voxel structure and a ball."""
    zz, yy, xx = np.indices(shape)
    radius = np.hypot(yy - 20, xx - 20)
    ring = (radius <= 12) & (radius > 5) & (zz >= 1) & (zz <= 4)
    blobs = np.zeros(shape, bool)
    blobs[3, 5:10, 5:12] = True
    blobs[3, 25:35, 28:33] = True
    dot = np.zeros(shape, bool)
    dot[2, 30, 8] = True
    ball = (zz - 2.5) ** 2 * 9 + (yy - 12) ** 2 + (xx - 26) ** 2 <= 40
    return {"Ring": ring, "Blobs": blobs, "Dot": dot, "Ball": ball}


def _write_ct(folder, geometry, ct=None, **meta):
    ct = np.zeros(geometry.shape, np.float32) if ct is None else ct
    return dicom.write_ct_series(ct, geometry, folder, meta=meta or None)


# ---------------------------------------------------------------------------------------------
# CT series
# ---------------------------------------------------------------------------------------------
def test_ct_round_trip(case, tmp_path):
    uids = dicom.write_ct_series(case.ct, case.geometry, tmp_path / "CT", meta={"PatientID": "P1"})
    assert len(os.listdir(tmp_path / "CT")) == case.geometry.shape[0]
    hu, geometry, meta = dicom.read_ct_series(tmp_path / "CT")
    assert hu.dtype == np.float32 and hu.shape == case.ct.shape
    assert np.abs(hu - case.ct).max() <= 0.5 + 1e-3  # int16 storage rounds HU
    assert geometry.matches(case.geometry, tolerance_mm=1e-6), (geometry, case.geometry)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUIDs"):
        assert meta[key] == uids[key]
    assert meta["PatientID"] == "P1" and meta["Modality"] == "CT" and meta["StudyDate"]
    ds = pydicom.dcmread(uids["files"][0])
    assert ds.SOPClassUID == dicom.CT_IMAGE_STORAGE and ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert ds.pixel_array.dtype == np.int16 and ds.RescaleType == "HU"


def test_ct_readable_by_gdcm(case, tmp_path):
    """An independent reader (SimpleITK/GDCM) sees the same series and grid."""
    dicom.write_ct_series(case.ct, case.geometry, tmp_path)
    reader = sitk.ImageSeriesReader()
    (series,) = reader.GetGDCMSeriesIDs(str(tmp_path))
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path), series))
    image = reader.Execute()
    assert ImageGeometry.from_sitk(image).matches(case.geometry, tolerance_mm=1e-4)
    assert np.abs(sitk.GetArrayFromImage(image) - case.ct).max() <= 0.5 + 1e-3


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_ct_round_trip_with_orientation(case, tmp_path, orientation):
    geometry = _regrid(case.geometry, ORIENTATIONS[orientation])
    dicom.write_ct_series(case.ct, geometry, tmp_path)
    hu, read_geometry, _ = dicom.read_ct_series(tmp_path)
    assert read_geometry.matches(geometry, tolerance_mm=1e-5), (read_geometry, geometry)
    assert np.abs(hu - case.ct).max() <= 0.5 + 1e-3


def test_left_handed_grid_comes_back_as_its_right_handed_equivalent(case, tmp_path):
    geometry = _regrid(case.geometry, (1, 0, 0, 0, 1, 0, 0, 0, -1))  # z decreasing with the index
    dicom.write_ct_series(case.ct, geometry, tmp_path)
    hu, read_geometry, _ = dicom.read_ct_series(tmp_path)
    assert np.abs(hu - case.ct[::-1]).max() <= 0.5 + 1e-3
    assert np.allclose(read_geometry.direction, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    last = geometry.index_to_physical(np.array([[geometry.shape[0] - 1, 0, 0]]))[0]
    assert np.allclose(read_geometry.origin, last)


def test_ct_slices_are_sorted_by_position_not_by_file_name(case, tmp_path):
    uids = dicom.write_ct_series(case.ct, case.geometry, tmp_path)
    rng = np.random.default_rng(0)
    for path, new_name in zip(uids["files"], rng.permutation(len(uids["files"]))):
        os.rename(path, tmp_path / f"img{new_name:03d}")  # no .dcm suffix: found by the DICM preamble
    hu, geometry, meta = dicom.read_ct_series(tmp_path)
    assert geometry.matches(case.geometry) and np.abs(hu - case.ct).max() <= 0.5 + 1e-3
    assert meta["SOPInstanceUIDs"] == uids["SOPInstanceUIDs"]


def test_ct_with_hu_beyond_int16_uses_a_rescale_slope(tmp_path):
    geometry = ImageGeometry((2, 4, 4), (1.0, 1.0, 2.0))
    ct = np.linspace(-1024, 60000, 32, dtype=np.float32).reshape(2, 4, 4)
    dicom.write_ct_series(ct, geometry, tmp_path)
    hu, _, _ = dicom.read_ct_series(tmp_path)
    assert np.abs(hu - ct).max() <= 1.0


def test_ct_pixels_fall_back_to_gdcm(case, tmp_path, monkeypatch):
    """Compressed slices that pydicom cannot decode are read through SimpleITK (GDCM), rescale applied once."""
    dicom.write_ct_series(case.ct, case.geometry, tmp_path)

    def no_decoder(path):
        raise RuntimeError("no pixel data handler")

    assert not dicom_ct._is_compressed(next(tmp_path.glob("*.dcm")))  # ours are uncompressed: pydicom's error is final
    monkeypatch.setattr(dicom_ct, "_pixels_with_pydicom", no_decoder)
    monkeypatch.setattr(dicom_ct, "_is_compressed", lambda path: True)  # as a JPEG-compressed series is
    hu, _, _ = dicom.read_ct_series(tmp_path)
    assert np.abs(hu - case.ct).max() <= 0.5 + 1e-3


def test_unequal_slice_spacing_is_refused(tmp_path):
    uids = _write_ct(tmp_path, ImageGeometry((5, 4, 4), (1.0, 1.0, 2.5)))
    os.remove(uids["files"][2])
    with pytest.raises(UnreadableInputError, match="unequal slice spacing"):
        dicom.read_ct_series(tmp_path)


def test_two_ct_series_pick_by_uid_or_largest(tmp_path):
    small = _write_ct(tmp_path / "a", ImageGeometry((3, 4, 4), (1.0, 1.0, 2.0)))
    large = _write_ct(tmp_path / "b", ImageGeometry((5, 4, 4), (1.0, 1.0, 2.0)))
    with pytest.warns(UserWarning, match="2 CT series"):
        _, geometry, meta = dicom.read_ct_series(tmp_path)
    assert meta["SeriesInstanceUID"] == large["SeriesInstanceUID"] and geometry.shape[0] == 5
    _, geometry, _ = dicom.read_ct_series(tmp_path, series_uid=small["SeriesInstanceUID"])
    assert geometry.shape[0] == 3


def test_folder_without_ct_is_refused(tmp_path):
    uids = _write_ct(tmp_path, ImageGeometry((1, 4, 4), (1.0, 1.0, 2.0)))
    ds = pydicom.dcmread(uids["files"][0])
    ds.Modality, ds.SOPClassUID = "MR", MR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    save_dataset(ds, Path(uids["files"][0]))
    with pytest.raises(UnreadableInputError, match=r"no CT series .*1 MR file"):
        dicom.read_ct_series(tmp_path)


def test_folder_with_only_an_rtstruct_is_refused(tmp_path):
    geometry = ImageGeometry((3, 8, 8), (1.0, 1.0, 2.0))
    uids = _write_ct(tmp_path / "ct", geometry)
    dicom.write_rtstruct({"Body": np.ones(geometry.shape, bool)}, geometry, uids, tmp_path / "rs" / "RS.dcm")
    with pytest.raises(UnreadableInputError, match="1 RTSTRUCT file"):
        dicom.read_ct_series(tmp_path / "rs")


def test_corrupt_files_and_missing_folder_are_refused(tmp_path):
    (tmp_path / "slice.dcm").write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(UnreadableInputError, match=r"unreadable or non-DICOM file \(slice.dcm\)"):
        dicom.read_ct_series(tmp_path)
    with pytest.raises(UnreadableInputError, match="does not exist"):
        dicom.read_ct_series(tmp_path / "nowhere")


def test_truncated_ct_slice_is_refused(tmp_path):
    uids = _write_ct(tmp_path, ImageGeometry((3, 16, 16), (1.0, 1.0, 2.0)))
    data = open(uids["files"][1], "rb").read()
    open(uids["files"][1], "wb").write(data[:-300])
    with pytest.raises(UnreadableInputError, match="cannot decode the pixel data"):
        dicom.read_ct_series(tmp_path)


def test_ct_refuses_to_overwrite_without_force(tmp_path):
    geometry = ImageGeometry((4, 4, 4), (1.0, 1.0, 2.0))
    _write_ct(tmp_path, geometry)
    with pytest.raises(OutputExistsError):
        _write_ct(tmp_path, geometry)
    smaller = ImageGeometry((2, 4, 4), (1.0, 1.0, 2.0))
    dicom.write_ct_series(np.zeros(smaller.shape), smaller, tmp_path, force=True)
    _, geometry_read, _ = dicom.read_ct_series(tmp_path)  # no stale slices of the first series left
    assert geometry_read.shape == smaller.shape


# ---------------------------------------------------------------------------------------------
# RTSTRUCT
# ---------------------------------------------------------------------------------------------
def test_rtstruct_round_trip_of_sample_structures(case, tmp_path):
    uids = dicom.write_ct_series(case.ct, case.geometry, tmp_path / "CT")
    dicom.write_rtstruct(case.structures, case.geometry, uids, tmp_path / "RS.dcm")
    _, geometry, meta = dicom.read_ct_series(tmp_path / "CT")
    masks = dicom.read_rtstruct(tmp_path / "RS.dcm", geometry, meta)
    assert set(masks) == set(case.structures)
    dice = {name: round(_dice(masks[name], mask), 4) for name, mask in case.structures.items()}
    assert min(dice.values()) >= 0.98, f"Dice per structure: {dice}"


def test_rtstruct_references_the_ct(case, tmp_path):
    uids = dicom.write_ct_series(case.ct, case.geometry, tmp_path / "CT", meta={"PatientID": "P7"})
    dicom.write_rtstruct({"PTV_70": case.structures["PTV_70"]}, case.geometry, uids, tmp_path / "RS.dcm",
                         colors={"PTV_70": (1, 2, 3)})
    ds = pydicom.dcmread(tmp_path / "RS.dcm")
    assert ds.Modality == "RTSTRUCT" and ds.SOPClassUID == dicom.RT_STRUCTURE_SET_STORAGE
    assert ds.StudyInstanceUID == uids["StudyInstanceUID"] and ds.PatientID == "P7"
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert frame.FrameOfReferenceUID == uids["FrameOfReferenceUID"]
    assert series.SeriesInstanceUID == uids["SeriesInstanceUID"]
    assert [i.ReferencedSOPInstanceUID for i in series.ContourImageSequence] == uids["SOPInstanceUIDs"]
    assert ds.StructureSetROISequence[0].ROIName == "PTV_70"
    assert ds.RTROIObservationsSequence[0].RTROIInterpretedType == "PTV"
    assert [int(c) for c in ds.ROIContourSequence[0].ROIDisplayColor] == [1, 2, 3]
    z_of_slice = {sop: float(pydicom.dcmread(f).ImagePositionPatient[2])
                  for sop, f in zip(uids["SOPInstanceUIDs"], uids["files"])}
    for contour in ds.ROIContourSequence[0].ContourSequence:
        z = np.asarray(contour.ContourData, float).reshape(-1, 3)[:, 2]
        assert np.allclose(z, z_of_slice[contour.ContourImageSequence[0].ReferencedSOPInstanceUID])


@pytest.mark.parametrize("orientation", ["identity", *sorted(ORIENTATIONS)])
def test_rtstruct_holes_and_separate_blobs(tmp_path, orientation):
    direction = ORIENTATIONS.get(orientation, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    geometry = ImageGeometry((6, 40, 40), (1.5, 1.2, 2.0), (-20.0, 7.0, 55.0), direction)
    masks = _small_masks(geometry.shape)
    uids = _write_ct(tmp_path / "CT", geometry)
    dicom.write_rtstruct(masks, geometry, uids, tmp_path / "RS.dcm")
    ds = pydicom.dcmread(tmp_path / "RS.dcm")
    contours = {roi.ROIName: len(item.ContourSequence)
                for roi, item in zip(ds.StructureSetROISequence, ds.ROIContourSequence)}
    assert contours["Ring"] == 2 * 4 and contours["Blobs"] == 2 and contours["Dot"] == 1  # outer + hole per slice
    read = dicom.read_rtstruct(tmp_path / "RS.dcm", geometry, uids)
    for name, mask in masks.items():
        assert np.array_equal(read[name], mask), f"{name}: {int((read[name] ^ mask).sum())} voxels differ"


def test_rtstruct_left_handed_grid(tmp_path):
    geometry = ImageGeometry((6, 40, 40), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, -1))
    masks = _small_masks(geometry.shape)
    uids = _write_ct(tmp_path / "CT", geometry)
    dicom.write_rtstruct(masks, geometry, uids, tmp_path / "RS.dcm")
    _, read_geometry, meta = dicom.read_ct_series(tmp_path / "CT")
    read = dicom.read_rtstruct(tmp_path / "RS.dcm", read_geometry, meta)  # on the CT's right-handed grid
    assert all(np.array_equal(read[n], m[::-1]) for n, m in masks.items())
    read = dicom.read_rtstruct(tmp_path / "RS.dcm", geometry)  # or on the original grid
    assert all(np.array_equal(read[n], m) for n, m in masks.items())


def test_rtstruct_onto_a_finer_grid(tmp_path):
    """Contours are placed in physical space: reading onto a grid with half the in-plane spacing works."""
    coarse = ImageGeometry((6, 40, 40), (2.0, 2.0, 2.0))
    square = np.zeros(coarse.shape, bool)
    square[2:4, 10:20, 10:30] = True
    uids = _write_ct(tmp_path, coarse)
    dicom.write_rtstruct({"Box": square}, coarse, uids, tmp_path / "RS.dcm")
    fine = ImageGeometry((6, 80, 80), (1.0, 1.0, 2.0), (-0.5, -0.5, 0.0))
    box = dicom.read_rtstruct(tmp_path / "RS.dcm", fine)["Box"]
    assert box.sum() == 2 * 20 * 40 and box[2:4, 20:40, 20:60].all()


def test_rtstruct_empty_roi_is_skipped_with_a_warning(tmp_path):
    geometry = ImageGeometry((3, 8, 8), (1.0, 1.0, 2.0))
    uids = _write_ct(tmp_path, geometry)
    body = np.zeros(geometry.shape, bool)
    body[:, 2:6, 2:6] = True
    with pytest.warns(UserWarning, match="'Empty' is empty"):
        dicom.write_rtstruct({"Body": body, "Empty": np.zeros(geometry.shape, bool)}, geometry, uids,
                             tmp_path / "RS.dcm")
    with pytest.warns(UserWarning, match="'Empty' has no contours"):
        masks = dicom.read_rtstruct(tmp_path / "RS.dcm", geometry)
    assert list(masks) == ["Body"]


def test_rtstruct_errors(tmp_path):
    geometry = ImageGeometry((3, 8, 8), (1.0, 1.0, 2.0))
    uids = _write_ct(tmp_path / "CT", geometry)
    body = np.ones(geometry.shape, bool)
    dicom.write_rtstruct({"Body": body}, geometry, uids, tmp_path / "RS.dcm")
    with pytest.raises(OutputExistsError):
        dicom.write_rtstruct({"Body": body}, geometry, uids, tmp_path / "RS.dcm")
    dicom.write_rtstruct({"Body2": body}, geometry, uids, tmp_path / "RS.dcm", force=True)
    with pytest.raises(GeometryMismatchError, match="frame of reference"):
        dicom.read_rtstruct(tmp_path / "RS.dcm", geometry, {"FrameOfReferenceUID": "1.2.3.4"})
    with pytest.raises(UnreadableInputError, match="Modality is CT"):
        dicom.read_rtstruct(uids["files"][0], geometry)
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 50)
    with pytest.raises(UnreadableInputError):
        dicom.read_rtstruct(tmp_path / "junk.dcm", geometry)
    with pytest.raises(GeometryMismatchError):  # masks on another grid than the CT's slices
        dicom.write_rtstruct({"Body": np.ones((4, 8, 8), bool)}, ImageGeometry((4, 8, 8), (1, 1, 2)), uids,
                             tmp_path / "RS2.dcm")


# ---------------------------------------------------------------------------------------------
# RTDOSE
# ---------------------------------------------------------------------------------------------
def test_rtdose_round_trip_references_the_ct(case, tmp_path):
    uids = dicom.write_ct_series(case.ct, case.geometry, tmp_path / "CT", meta={"PatientID": "P9",
                                                                               "PatientName": "Doe^Jane"})
    sop = dicom.write_rtdose(case.dose, case.geometry, tmp_path / "RD.dcm", reference_meta=uids)
    ds = pydicom.dcmread(tmp_path / "RD.dcm")
    assert ds.Modality == "RTDOSE" and ds.SOPClassUID == dicom.RT_DOSE_STORAGE and ds.SOPInstanceUID == sop
    assert ds.StudyInstanceUID == uids["StudyInstanceUID"]
    assert ds.FrameOfReferenceUID == uids["FrameOfReferenceUID"]
    assert ds.PatientID == "P9" and str(ds.PatientName) == "Doe^Jane"
    assert (ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == ("GY", "PHYSICAL", "PLAN")
    assert int(ds.NumberOfFrames) == case.geometry.shape[0] and ds.BitsAllocated == 32
    assert ds.pixel_array.dtype == np.uint32 and ds.pixel_array.max() > 0.9 * dicom.UINT32_MAX
    assert float(ds.DoseGridScaling) > 0 and float(ds.GridFrameOffsetVector[0]) == 0.0
    dose, geometry, meta = dicom.read_rtdose(tmp_path / "RD.dcm")
    assert dose.dtype == np.float32 and np.abs(dose - case.dose).max() <= 0.01
    assert geometry.shape == case.geometry.shape
    assert np.allclose(geometry.spacing, case.geometry.spacing) and np.allclose(geometry.origin, case.geometry.origin)
    assert np.allclose(geometry.direction, case.geometry.direction)
    assert meta["StudyInstanceUID"] == uids["StudyInstanceUID"] and meta["SOPInstanceUID"] == sop
    assert meta["FrameOfReferenceUID"] == uids["FrameOfReferenceUID"]


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_rtdose_round_trip_with_orientation(case, tmp_path, orientation):
    geometry = _regrid(case.geometry, ORIENTATIONS[orientation])
    dicom.write_rtdose(case.dose, geometry, tmp_path / "RD.dcm")
    dose, read_geometry, meta = dicom.read_rtdose(tmp_path / "RD.dcm")
    assert read_geometry.matches(geometry, tolerance_mm=1e-5) and np.abs(dose - case.dose).max() <= 0.01
    assert meta["StudyInstanceUID"] and meta["FrameOfReferenceUID"]  # fresh UIDs without a reference


def test_rtdose_readable_by_gdcm(case, tmp_path):
    dicom.write_rtdose(case.dose, case.geometry, tmp_path / "RD.dcm")
    image = sitk.ReadImage(str(tmp_path / "RD.dcm"))
    assert ImageGeometry.from_sitk(image).matches(case.geometry, tolerance_mm=1e-4)


def test_rtdose_with_decreasing_absolute_offsets(case, tmp_path):
    """Vendors write absolute or decreasing GridFrameOffsetVectors; frames are reordered onto one grid."""
    dicom.write_rtdose(case.dose, case.geometry, tmp_path / "RD.dcm")
    ds = pydicom.dcmread(tmp_path / "RD.dcm")
    nz = case.geometry.shape[0]
    top = case.geometry.index_to_physical(np.array([[nz - 1, 0, 0]]))[0]
    ds.ImagePositionPatient = [str(v) for v in top]
    ds.GridFrameOffsetVector = [str(top[2] - 3.0 * k) for k in range(nz)]  # absolute z, decreasing
    frames = ds.pixel_array[::-1].copy()
    ds.PixelData = frames.tobytes()
    ds.save_as(tmp_path / "RD2.dcm")
    dose, geometry, _ = dicom.read_rtdose(tmp_path / "RD2.dcm")
    assert geometry.matches(case.geometry) and np.abs(dose - case.dose).max() <= 0.01


def test_rtdose_errors(case, tmp_path):
    bad = case.dose.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InvalidDoseError):
        dicom.write_rtdose(bad, case.geometry, tmp_path / "RD.dcm")
    with pytest.raises(InvalidDoseError):
        dicom.write_rtdose(case.dose - 5.0, case.geometry, tmp_path / "RD.dcm")
    dicom.write_rtdose(np.zeros(case.geometry.shape), case.geometry, tmp_path / "RD.dcm")  # all zero is fine
    assert dicom.read_rtdose(tmp_path / "RD.dcm")[0].max() == 0.0
    with pytest.raises(OutputExistsError):
        dicom.write_rtdose(case.dose, case.geometry, tmp_path / "RD.dcm")
    uids = dicom.write_ct_series(np.zeros((2, 4, 4)), ImageGeometry((2, 4, 4), (1, 1, 1)), tmp_path / "CT")
    with pytest.raises(UnreadableInputError, match="not an RTDOSE"):
        dicom.read_rtdose(uids["files"][0])
    with pytest.raises(UnreadableInputError):
        dicom.read_rtdose(tmp_path / "missing.dcm")


# ---------------------------------------------------------------------------------------------
# whole cases
# ---------------------------------------------------------------------------------------------
def test_case_round_trip(case, tmp_path):
    written = dicom.write_dicom_case(case, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["CT", "RD.dcm", "RP.dcm", "RS.dcm"]
    read = dicom.read_dicom_case(tmp_path / "out")
    assert isinstance(read, PlanningCase) and set(read.structures) == set(case.structures)
    assert read.prescriptions == {"PTV_70": 70.0, "PTV_63": 63.0, "PTV_56": 56.0}
    assert read.geometry.matches(case.geometry) and np.abs(read.ct - case.ct).max() <= 0.5 + 1e-3
    assert np.abs(read.dose - case.dose).max() <= 0.01
    assert all(np.array_equal(read.structures[n], m) for n, m in case.structures.items())
    assert read.patient_id == case.patient_id
    for key in ("StudyInstanceUID", "FrameOfReferenceUID"):
        assert read.metadata[key] == written[key]
    assert read.metadata["SeriesInstanceUID"] == written["CTSeriesInstanceUID"]
    assert read.metadata["RTDoseSOPInstanceUID"] == written["RTDoseSOPInstanceUID"]
    assert read.metadata["PatientName"] == case.patient_id
    # the case's UIDs let an exported dose join the original study
    dicom.write_rtdose(read.dose, read.geometry, tmp_path / "new_RD.dcm", reference_meta=read.metadata)
    again = pydicom.dcmread(tmp_path / "new_RD.dcm")
    assert again.StudyInstanceUID == written["StudyInstanceUID"]
    assert again.FrameOfReferenceUID == written["FrameOfReferenceUID"]


def test_case_reuses_metadata_uids_and_refuses_overwrite(case, tmp_path):
    study, frame = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    source = case.with_dose(case.dose)
    source.metadata.update(StudyInstanceUID=study, FrameOfReferenceUID=frame, PatientName="Roe^R",
                           SeriesInstanceUID="1.2.3")
    written = dicom.write_dicom_case(source, tmp_path)
    assert (written["StudyInstanceUID"], written["FrameOfReferenceUID"]) == (study, frame)
    assert written["CTSeriesInstanceUID"] != "1.2.3"  # new instances get a new series
    for path in (written["rtstruct"], written["rtdose"], written["ct_files"][0]):
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == study and str(ds.PatientName) == "Roe^R"
    with pytest.raises(OutputExistsError):
        dicom.write_dicom_case(source, tmp_path)
    without_dose = PlanningCase(source.geometry, ct=source.ct, structures=source.structures,
                                prescriptions=source.prescriptions, metadata=source.metadata)
    dicom.write_dicom_case(without_dose, tmp_path, force=True)
    assert sorted(os.listdir(tmp_path)) == ["CT", "RS.dcm"]  # the earlier RD.dcm does not linger
    assert dicom.read_dicom_case(tmp_path).dose is None


def test_case_with_raw_names_dose_on_another_grid_and_a_second_ct(tmp_path):
    """Structures are matched to canonical names, the RTSTRUCT picks its CT among two series, and an RTDOSE on
    a coarser grid is resampled (linearly, so a linear dose comes back exactly inside the grid)."""
    geometry = ImageGeometry((8, 24, 24), (2.0, 2.0, 3.0), (-23.0, -23.0, 0.0))
    _write_ct(tmp_path / "other_ct", ImageGeometry((12, 24, 24), (2.0, 2.0, 3.0)))  # larger, but unreferenced
    uids = _write_ct(tmp_path / "ct", geometry, ct=np.full(geometry.shape, 40.0, np.float32), PatientID="X1")
    masks = {name: np.zeros(geometry.shape, bool) for name in ("PTV70", "Parotid Lt", "cord", "Unknown thing")}
    for i, mask in enumerate(masks.values()):
        mask[2:6, 4 + 4 * i:7 + 4 * i, 5:15] = True
    dicom.write_rtstruct(masks, geometry, uids, tmp_path / "rs" / "RS.dcm")
    coarse = ImageGeometry((5, 13, 13), (4.0, 4.0, 6.0), (-25.0, -25.0, -1.5))
    physical = coarse.index_to_physical(np.indices(coarse.shape).reshape(3, -1).T)
    linear = (30.0 + 0.5 * physical[:, 0] + 0.2 * physical[:, 2]).reshape(coarse.shape)
    dicom.write_rtdose(linear, coarse, tmp_path / "RD.dcm", reference_meta=uids)
    read = dicom.read_dicom_case(tmp_path, overrides={"Unknown thing": None}, prescriptions={"PTV_70": 66.0})
    assert sorted(read.structures) == ["PTV_70", "Parotid_L", "SpinalCord"]
    assert read.prescriptions == {"PTV_70": 66.0} and read.patient_id == "X1"
    assert read.geometry.matches(geometry) and np.allclose(read.ct, 40.0)
    points = geometry.index_to_physical(np.indices(geometry.shape).reshape(3, -1).T)
    expected = (30.0 + 0.5 * points[:, 0] + 0.2 * points[:, 2]).reshape(geometry.shape)
    assert np.abs(read.dose - expected).max() < 0.01


def test_case_errors(case, tmp_path):
    with pytest.raises(UnreadableInputError, match="does not exist"):
        dicom.read_dicom_case(tmp_path / "nowhere")
    geometry = ImageGeometry((2, 4, 4), (1.0, 1.0, 2.0))
    _write_ct(tmp_path, geometry)
    with pytest.warns(UserWarning, match="no RTSTRUCT"):
        read = dicom.read_dicom_case(tmp_path)
    assert read.structures == {} and read.dose is None
    with pytest.raises(OutputExistsError):  # nothing is written when any output exists
        dicom.write_dicom_case(read, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean case reads without warnings
        dicom.write_dicom_case(case, tmp_path / "clean")
        dicom.read_dicom_case(tmp_path / "clean")
