"""What every DICOM object written here shares: SOP classes, study attributes, file meta, image planes, saving.

The CT, RTSTRUCT, RTDOSE and RTPLAN writers take their common ground from here (and from nowhere else), so
that the package's imports run one way: this module imports none of its siblings.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from doseai.errors import GeometryMismatchError
from doseai.geometry import ImageGeometry

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"  # what RTReferencedStudySequence conventionally names
MANUFACTURER = "SlicerDoseAI"
UINT32_MAX = 2**32 - 1

# Study-level attributes carried from a reference (CT or case metadata) into every object written.
PATIENT_STUDY_KEYS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "StudyDescription", "AccessionNumber",
    "ReferringPhysicianName",
)
# What a case's metadata needs so that objects written later (a plan's RTDOSE and RTPLAN) join the patient, study,
# frame of reference and structure set just written: write_dicom_case returns them.
REFERENCE_KEYS = PATIENT_STUDY_KEYS + ("FrameOfReferenceUID", "RTStructSOPInstanceUID")


def decimal_string(value: float) -> str:
    """A Decimal String of at most 16 characters (``.10g`` never exceeds it)."""
    text = format(float(value), ".10g")
    return "0" if text == "-0" else text


def decimal_strings(values: np.ndarray) -> list[str]:
    """Every value of ``values`` (flattened) as a Decimal String, for multi-valued DS attributes."""
    return [decimal_string(v) for v in np.asarray(values, dtype=float).ravel()]


def now() -> tuple[str, str]:
    """The current (DA, TM) pair, e.g. ('20240131', '142501'), for creation dates and times."""
    current = datetime.datetime.now()
    return current.strftime("%Y%m%d"), current.strftime("%H%M%S")


def _slice_axis_sign(geometry: ImageGeometry) -> float:
    """+1 when the slice axis is row x column (DICOM's normal), -1 when opposite; refuses sheared grids."""
    d = geometry.direction_matrix
    normal = np.cross(d[:, 0], d[:, 1])
    cosine = float(np.dot(normal, d[:, 2]) / (np.linalg.norm(normal) * np.linalg.norm(d[:, 2])))
    if abs(abs(cosine) - 1.0) > 1e-4:
        raise GeometryMismatchError(
            "the grid's slice axis is not perpendicular to its rows and columns (a sheared grid), which DICOM "
            "image planes cannot store; resample it onto an orthogonal grid first"
        )
    return 1.0 if cosine > 0 else -1.0


def right_handed(array: np.ndarray, geometry: ImageGeometry) -> tuple[np.ndarray, ImageGeometry]:
    """The same voxels on a grid whose slice axis is row x column (z flipped when it was the other way)."""
    if _slice_axis_sign(geometry) > 0:
        return array, geometry
    d = geometry.direction_matrix.copy()
    d[:, 2] *= -1
    origin = geometry.index_to_physical(np.array([[geometry.shape[0] - 1, 0, 0]]))[0]
    flipped = ImageGeometry(geometry.shape, geometry.spacing, tuple(origin), tuple(d.ravel()))
    return np.asarray(array)[::-1], flipped


def check_on_grid(array: np.ndarray, geometry: ImageGeometry, what: str) -> np.ndarray:
    """``array`` as an ndarray, refused unless it has the grid's shape (``what`` names it in the error)."""
    array = np.asarray(array)
    if array.shape != geometry.shape:
        raise GeometryMismatchError(
            f"{what} has shape {array.shape} but the grid is {geometry.shape}; resample it first"
        )
    return array


def study_info(reference: Mapping[str, Any] | None) -> dict[str, str]:
    """Patient/study attributes and the frame of reference: taken from ``reference`` where given, new otherwise."""
    reference = reference or {}
    date, time = now()
    info = {key: str(reference.get(key) or "") for key in PATIENT_STUDY_KEYS}
    info["PatientID"] = info["PatientID"] or "anonymous"
    info["PatientName"] = info["PatientName"] or info["PatientID"]
    info["StudyInstanceUID"] = info["StudyInstanceUID"] or generate_uid()
    info["StudyDate"] = info["StudyDate"] or date
    info["StudyTime"] = info["StudyTime"] or time
    info["StudyID"] = info["StudyID"] or "1"
    info["FrameOfReferenceUID"] = str(reference.get("FrameOfReferenceUID") or generate_uid())
    return info


def new_instance(
    sop_class: str, info: Mapping[str, str], modality: str, series_number: str, description: str, *,
    sop_uid: str | None = None, series_uid: str | None = None, instance_number: str = "1",
) -> Dataset:
    """What every object written here starts as: file meta, SOP Common, the patient, study and frame of reference
    of ``info`` (see :func:`study_info`) and a General Series of ``modality``; new UIDs where none are given."""
    ds = _new_dataset(sop_class, sop_uid or generate_uid())
    for key in PATIENT_STUDY_KEYS:
        setattr(ds, key, info.get(key, ""))
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    ds.FrameOfReferenceUID = info["FrameOfReferenceUID"]
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = instance_number
    return ds


def _new_dataset(sop_class: str, sop_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, so any patient name survives
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = now()
    return ds


def fill_plane(ds: Dataset, geometry: ImageGeometry, k: int = 0) -> None:
    """Image Plane attributes of slice ``k`` (geometry must be right-handed, see :func:`right_handed`)."""
    d = geometry.direction_matrix
    ds.ImagePositionPatient = decimal_strings(geometry.index_to_physical(np.array([[k, 0, 0]]))[0])
    ds.ImageOrientationPatient = decimal_strings(np.concatenate([d[:, 0], d[:, 1]]))
    ds.PixelSpacing = decimal_strings([geometry.spacing[1], geometry.spacing[0]])  # row spacing (y), column (x)
    ds.SliceThickness = decimal_string(geometry.spacing[2])
    ds.Rows, ds.Columns = geometry.shape[1], geometry.shape[2]


def save_dataset(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM file with preamble and file meta. pydicom 3 names this ``enforce_file_format``;
    pydicom 2.4 (what Slicer 5.10 bundles) names it ``write_like_original=False``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, write_like_original=False)
