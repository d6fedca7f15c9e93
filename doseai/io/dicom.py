"""DICOM-RT input and output: CT series, RTSTRUCT, RTDOSE and whole planning cases.

Arrays are indexed [z, y, x] on an :class:`ImageGeometry` (LPS, mm) as everywhere in ``doseai``.
DICOM image planes give the first two direction columns (ImageOrientationPatient: row, then column
direction); the slice axis is their cross product, slices are ordered by position along it. A grid
whose slice axis points the other way (left-handed direction) is therefore written as its z-flipped,
right-handed equivalent: same voxels in space, ``array[::-1]``, origin at the former last slice.

Structures are stored as CLOSED_PLANAR contours that run through the edge midpoints between voxel
centres (marching squares at level 0.5), and read back by even-odd filling with voxel-centre
inclusion, so a mask written here comes back voxel for voxel, holes included.
"""

from __future__ import annotations

import datetime
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import contourpy
import numpy as np
import pydicom
import SimpleITK as sitk
from matplotlib.path import Path as PolygonPath
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from doseai.case import PlanningCase, validate_dose
from doseai.errors import (DoseAIError, GeometryMismatchError, OutputExistsError, UnreadableInputError, refuse_malformed,
                           refuse_overwrite)
from doseai.geometry import ImageGeometry
from doseai.resample import resample_to
from doseai.structures import canonical_name, is_target

if TYPE_CHECKING:
    from doseai.io.rtplan import PlanDescription

__all__ = [
    "read_ct_series",
    "write_ct_series",
    "read_rtstruct",
    "write_rtstruct",
    "read_rtdose",
    "write_rtdose",
    "read_dicom_case",
    "write_dicom_case",
]

PathLike = str | os.PathLike

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"  # what RTReferencedStudySequence conventionally names
MANUFACTURER = "SlicerDoseAI"
UINT32_MAX = 2**32 - 1

# Study-level attributes carried from a reference (CT or case metadata) into every object written.
_PATIENT_STUDY_KEYS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "StudyDescription", "AccessionNumber",
    "ReferringPhysicianName",
)
# What a case's metadata needs so that objects written later (a plan's RTDOSE and RTPLAN) join the patient, study,
# frame of reference and structure set just written: write_dicom_case returns them.
REFERENCE_KEYS = _PATIENT_STUDY_KEYS + ("FrameOfReferenceUID", "RTStructSOPInstanceUID")
_META_KEYS = _PATIENT_STUDY_KEYS + (
    "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "FrameOfReferenceUID", "Modality",
    "Manufacturer", "PatientPosition",
)
_POSITION_TOL_MM = 0.01


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters (``.10g`` never exceeds it)."""
    text = format(float(value), ".10g")
    return "0" if text == "-0" else text


def _ds_list(values: np.ndarray) -> list[str]:
    return [_ds(v) for v in np.asarray(values, dtype=float).ravel()]


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value)


def _meta_of(ds: Dataset) -> dict[str, Any]:
    return {key: _text(ds, key) for key in _META_KEYS}


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


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


def _right_handed(array: np.ndarray, geometry: ImageGeometry) -> tuple[np.ndarray, ImageGeometry]:
    """The same voxels on a grid whose slice axis is row x column (z flipped when it was the other way)."""
    if _slice_axis_sign(geometry) > 0:
        return array, geometry
    d = geometry.direction_matrix.copy()
    d[:, 2] *= -1
    origin = geometry.index_to_physical(np.array([[geometry.shape[0] - 1, 0, 0]]))[0]
    flipped = ImageGeometry(geometry.shape, geometry.spacing, tuple(origin), tuple(d.ravel()))
    return np.asarray(array)[::-1], flipped


def _check_on_grid(array: np.ndarray, geometry: ImageGeometry, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != geometry.shape:
        raise GeometryMismatchError(
            f"{what} has shape {array.shape} but the grid is {geometry.shape}; resample it first"
        )
    return array


def _looks_like_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


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
    date, time = _now()
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    return ds


def _study_info(reference: Mapping[str, Any] | None) -> dict[str, str]:
    """Patient/study attributes and the frame of reference: taken from ``reference`` where given, new otherwise."""
    reference = reference or {}
    date, time = _now()
    info = {key: str(reference.get(key) or "") for key in _PATIENT_STUDY_KEYS}
    info["PatientID"] = info["PatientID"] or "anonymous"
    info["PatientName"] = info["PatientName"] or info["PatientID"]
    info["StudyInstanceUID"] = info["StudyInstanceUID"] or generate_uid()
    info["StudyDate"] = info["StudyDate"] or date
    info["StudyTime"] = info["StudyTime"] or time
    info["StudyID"] = info["StudyID"] or "1"
    info["FrameOfReferenceUID"] = str(reference.get("FrameOfReferenceUID") or generate_uid())
    return info


def _fill_patient_study(ds: Dataset, info: Mapping[str, str]) -> None:
    for key in _PATIENT_STUDY_KEYS:
        setattr(ds, key, info.get(key, ""))


def _fill_series(ds: Dataset, modality: str, series_uid: str, number: str, description: str) -> None:
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER


def _fill_plane(ds: Dataset, geometry: ImageGeometry, k: int = 0) -> None:
    """Image Plane attributes of slice ``k`` (geometry must be right-handed, see :func:`_right_handed`)."""
    d = geometry.direction_matrix
    ds.ImagePositionPatient = _ds_list(geometry.index_to_physical(np.array([[k, 0, 0]]))[0])
    ds.ImageOrientationPatient = _ds_list(np.concatenate([d[:, 0], d[:, 1]]))
    ds.PixelSpacing = _ds_list([geometry.spacing[1], geometry.spacing[0]])  # row spacing (y), column spacing (x)
    ds.SliceThickness = _ds(geometry.spacing[2])
    ds.Rows, ds.Columns = geometry.shape[1], geometry.shape[2]


def _save(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM file with preamble and file meta. pydicom 3 names this ``enforce_file_format``;
    pydicom 2.4 (what Slicer 5.10 bundles) names it ``write_like_original=False``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, write_like_original=False)


# ------------------------------------------------------------------------------------------------
# scanning a folder
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    """One DICOM file found by :func:`_scan`, with its header (no pixel data)."""

    path: Path
    header: Dataset

    @property
    def modality(self) -> str:
        return _text(self.header, "Modality").upper()

    def get(self, keyword: str) -> str:
        return _text(self.header, keyword)


@dataclass
class _Scan:
    folder: Path
    entries: list[_Entry]
    unreadable: list[Path]

    def of(self, modality: str) -> list[_Entry]:
        return [e for e in self.entries if e.modality == modality]

    def describe(self) -> str:
        """What was found, for error messages: '3 MR files, 1 RTSTRUCT file, 2 unreadable files (a.dcm, ...)'."""
        counts: dict[str, int] = {}
        for entry in self.entries:
            key = entry.modality or "unknown-modality"
            counts[key] = counts.get(key, 0) + 1
        parts = [f"{n} {m} file{'s' * (n > 1)}" for m, n in sorted(counts.items())]
        if self.unreadable:
            names = ", ".join(p.name for p in self.unreadable[:3]) + (", ..." if len(self.unreadable) > 3 else "")
            plural = "s" * (len(self.unreadable) > 1)
            parts.append(f"{len(self.unreadable)} unreadable or non-DICOM file{plural} ({names})")
        return ", ".join(parts) or "no files"


def _read_header(path: Path) -> Dataset | None:
    """The header of a DICOM file, or None when it is not DICOM or is corrupt."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        if path.suffix.lower() not in ("", ".dcm", ".ima"):
            return None  # other files (.nrrd, .txt, ...) are not worth a forced parse
        # old files without the 128-byte preamble still parse when forced; garbage yields no SOP class
    except Exception:  # noqa: BLE001 - pydicom raises many kinds on corrupt input
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return ds if "SOPClassUID" in ds and "Modality" in ds else None
    except Exception:  # noqa: BLE001
        return None


def _scan(folder: PathLike) -> _Scan:
    """Headers of all DICOM files under ``folder`` (recursively); files that do not parse are listed apart."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UnreadableInputError(f"{folder} {what}; give the folder that holds the DICOM files")
    entries, unreadable = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        header = _read_header(path)
        if header is None:
            unreadable.append(path)
        else:
            entries.append(_Entry(path, header))
    return _Scan(folder, entries, unreadable)


# ------------------------------------------------------------------------------------------------
# CT series
# ------------------------------------------------------------------------------------------------
@refuse_malformed("DICOM CT series")
def read_ct_series(
    folder: PathLike, series_uid: str | None = None
) -> tuple[np.ndarray, ImageGeometry, dict[str, Any]]:
    """Read the CT series in ``folder`` (searched recursively) as float32 HU [z, y, x], its grid and metadata.

    With several CT series, ``series_uid`` picks one; otherwise the one with most slices is read (with a
    warning). ``meta`` holds patient/study/series attributes by DICOM keyword, ``SOPInstanceUIDs`` and
    ``files`` in slice order.
    """
    scan = _scan(folder)
    return _read_ct_entries(_pick_ct_series(scan, series_uid))


def _ct_series_groups(scan: _Scan) -> dict[str, list[_Entry]]:
    groups: dict[str, list[_Entry]] = {}
    for entry in scan.of("CT"):
        groups.setdefault(entry.get("SeriesInstanceUID"), []).append(entry)
    return groups


def _pick_ct_series(scan: _Scan, series_uid: str | None = None) -> list[_Entry]:
    groups = _ct_series_groups(scan)
    if not groups:
        raise UnreadableInputError(
            f"no CT series in {scan.folder} (found {scan.describe()}); "
            "point to the folder holding the planning CT slices"
        )
    if series_uid is not None:
        if series_uid not in groups:
            raise UnreadableInputError(
                f"CT series {series_uid} is not in {scan.folder} (it holds {', '.join(groups)}); pick one of those"
            )
        return groups[series_uid]
    if len(groups) > 1:
        warnings.warn(
            f"{scan.folder} holds {len(groups)} CT series; reading the largest. Pass series_uid to choose another.",
            stacklevel=3,
        )
    return max(groups.values(), key=len)


def _uniform_step(positions: np.ndarray, what: str) -> float:
    """The common spacing of sorted ``positions`` (mm); unequal or repeated spacing is an error."""
    steps = np.diff(positions)
    if steps.size == 0:
        return 0.0
    if steps.min() < _POSITION_TOL_MM:
        raise UnreadableInputError(f"{what} has two slices at the same position; remove the duplicate slices")
    if steps.max() - steps.min() > _POSITION_TOL_MM + 1e-3 * steps.mean():
        raise UnreadableInputError(
            f"{what} has unequal slice spacing ({steps.min():.3g} to {steps.max():.3g} mm; a slice may be missing); "
            "give a complete series with equally spaced slices, or resample it first"
        )
    return float(steps.mean())


def _plane_vectors(ds: Dataset, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row, column and normal vectors from ImageOrientationPatient."""
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:6] / np.linalg.norm(iop[3:6])
    except (AttributeError, ValueError, TypeError, IndexError) as error:
        raise UnreadableInputError(
            f"{what} has no valid ImageOrientationPatient ({error}); it cannot be placed in space"
        ) from error
    return row, col, np.cross(row, col)


def _pixel_spacing(ds: Dataset, what: str) -> tuple[float, float]:
    """(x, y) spacing: PixelSpacing is stored as (row spacing = y, column spacing = x)."""
    try:
        dy, dx = (float(v) for v in ds.PixelSpacing)
    except (AttributeError, ValueError, TypeError) as error:
        raise UnreadableInputError(f"{what} has no valid PixelSpacing; it cannot be placed in space") from error
    return dx, dy


def _read_ct_entries(entries: list[_Entry]) -> tuple[np.ndarray, ImageGeometry, dict[str, Any]]:
    first = entries[0].header
    what = f"CT series {first.get('SeriesInstanceUID', '?')}"
    row, col, normal = _plane_vectors(first, what)
    spacing_xy = _pixel_spacing(first, what)
    shape_yx = (int(first.Rows), int(first.Columns))
    for entry in entries:
        if "ImagePositionPatient" not in entry.header:
            raise UnreadableInputError(
                f"{entry.path} has no ImagePositionPatient (an enhanced multi-frame CT?); "
                "export the CT as single-frame slices"
            )
        e_row, e_col, _ = _plane_vectors(entry.header, str(entry.path))
        if not (np.allclose(e_row, row, atol=1e-4) and np.allclose(e_col, col, atol=1e-4)
                and (int(entry.header.Rows), int(entry.header.Columns)) == shape_yx
                and np.allclose(_pixel_spacing(entry.header, str(entry.path)), spacing_xy, atol=1e-4)):
            raise UnreadableInputError(
                f"{what}: slice {entry.path.name} differs from the others in orientation, size or pixel spacing; "
                "export the series again as one consistent image stack"
            )
    ipp = np.array([[float(v) for v in e.header.ImagePositionPatient] for e in entries])
    order = np.argsort(ipp @ normal, kind="stable")
    entries, ipp = [entries[i] for i in order], ipp[order]
    dz = _uniform_step(ipp @ normal, what) or float(first.get("SliceThickness") or 1.0)
    _check_no_tilt(ipp, normal, what)
    direction = np.column_stack([row, col, normal])
    geometry = ImageGeometry(
        shape=(len(entries), *shape_yx), spacing=(*spacing_xy, dz), origin=tuple(ipp[0]),
        direction=tuple(direction.ravel()),
    )
    hu = np.stack([_slice_hu(e.path) for e in entries]).astype(np.float32, copy=False)
    meta = _meta_of(first)
    meta["SOPInstanceUIDs"] = [e.get("SOPInstanceUID") for e in entries]
    meta["files"] = [str(e.path) for e in entries]
    return hu, geometry, meta


def _check_no_tilt(ipp: np.ndarray, normal: np.ndarray, what: str) -> None:
    """Slices must be stacked along their normal; a gantry-tilted (sheared) stack is refused."""
    if len(ipp) < 2:
        return
    offset = ipp[-1] - ipp[0]
    lateral = np.linalg.norm(offset - np.dot(offset, normal) * normal)
    if lateral > _POSITION_TOL_MM + 1e-3 * np.linalg.norm(offset):
        raise UnreadableInputError(
            f"{what} is not stacked along the slice normal (gantry tilt, {lateral:.2f} mm sideways); "
            "resample it to an orthogonal grid first"
        )


def _pixels_with_pydicom(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float64)
    return pixels * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)


def _is_compressed(path: Path) -> bool:
    """Whether the file's transfer syntax compresses its pixel data (unknown counts as compressed)."""
    try:
        syntax = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta.TransferSyntaxUID
        return bool(syntax.is_compressed)
    except Exception:  # noqa: BLE001 - no file meta, unknown syntax: let GDCM try
        return True


def _slice_hu(path: Path) -> np.ndarray:
    """HU of one slice: pydicom first; GDCM (SimpleITK) for compressed data pydicom has no decoder for."""
    try:
        return _pixels_with_pydicom(path)
    except Exception as pydicom_error:  # noqa: BLE001
        if not _is_compressed(path):  # uncompressed data pydicom cannot read is corrupt (some GDCM builds pad it)
            raise UnreadableInputError(
                f"cannot decode the pixel data of {path} ({pydicom_error}); the file may be truncated") from None
        try:  # GDCM applies RescaleSlope/Intercept itself
            return sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))[0].astype(np.float64)
        except Exception:  # noqa: BLE001
            raise UnreadableInputError(
                f"cannot decode the pixel data of {path} ({pydicom_error}); the file may be truncated or use an "
                "unsupported compression: export the CT uncompressed"
            ) from pydicom_error


def _rescale_for(hu: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) so that HU fit int16: identity for the usual -1024..3071 range."""
    lo, hi = float(hu.min(initial=0.0)), float(hu.max(initial=0.0))
    if lo >= -32768 and hi <= 32767:
        return 1.0, 0.0
    slope = float(_ds((hi - lo) / 65000.0))
    return slope, float(_ds((hi + lo) / 2.0))


def _clear_own_slices(folder: Path, force: bool) -> None:
    """Refuse a folder with DICOM files unless ``force``; with it, remove earlier ``CT_*.dcm`` slices of ours
    so that no stale slice from a larger series is left to mix into the new one."""
    if not folder.is_dir():
        return
    existing = [p for p in folder.iterdir() if p.is_file() and _looks_like_dicom_file(p)]
    if existing and not force:
        raise OutputExistsError(
            f"{folder} already holds {len(existing)} DICOM file(s); choose an empty folder or pass force=True (--force)"
        )
    for path in existing:
        if re.fullmatch(r"CT_\d+\.dcm", path.name):
            path.unlink()


def write_ct_series(
    ct_hu: np.ndarray,
    geometry: ImageGeometry,
    folder: PathLike,
    meta: Mapping[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write ``ct_hu`` as one CT Image Storage file per slice (``CT_0001.dcm``, ...) in ``folder``.

    ``meta`` may give patient/study attributes, StudyInstanceUID, FrameOfReferenceUID, SeriesInstanceUID
    and SOPInstanceUIDs; missing UIDs are generated. Returns the attributes used (UIDs, ``SOPInstanceUIDs``
    in slice order along the slice normal, ``files``) for :func:`write_rtstruct` / :func:`write_rtdose`.
    """
    ct = _check_on_grid(ct_hu, geometry, "CT").astype(np.float32)
    if not np.isfinite(ct).all():
        raise DoseAIError("the CT contains NaN or infinite values; fix or mask them before writing DICOM")
    ct, geometry = _right_handed(ct, geometry)
    folder = Path(folder)
    _clear_own_slices(folder, force)
    meta = dict(meta or {})
    info = _study_info(meta)
    series_uid = str(meta.get("SeriesInstanceUID") or generate_uid())
    sop_uids = list(meta.get("SOPInstanceUIDs") or [])
    if len(sop_uids) != geometry.shape[0]:
        sop_uids = [generate_uid() for _ in range(geometry.shape[0])]
    slope, intercept = _rescale_for(ct)
    stored = np.clip(np.round((ct - intercept) / slope), -32768, 32767).astype("<i2")
    width = max(4, len(str(geometry.shape[0])))
    files = []
    for k in range(geometry.shape[0]):
        ds = _ct_slice(stored[k], geometry, k, info, series_uid, sop_uids[k], meta, (slope, intercept))
        path = folder / f"CT_{k + 1:0{width}d}.dcm"
        _save(ds, path)
        files.append(str(path))
    return {**info, "SeriesInstanceUID": series_uid, "SOPInstanceUIDs": sop_uids, "files": files}


def _ct_slice(
    pixels: np.ndarray, geometry: ImageGeometry, k: int, info: Mapping[str, str], series_uid: str,
    sop_uid: str, meta: Mapping[str, Any], rescale: tuple[float, float],
) -> Dataset:
    ds = _new_dataset(CT_IMAGE_STORAGE, sop_uid)
    _fill_patient_study(ds, info)
    _fill_series(ds, "CT", series_uid, str(meta.get("SeriesNumber") or "1"),
                 str(meta.get("SeriesDescription") or "CT"))
    ds.PatientPosition = str(meta.get("PatientPosition") or "")
    ds.Laterality = ""  # Type 2C of General Series: unknown, as for the whole head and neck
    ds.FrameOfReferenceUID = info["FrameOfReferenceUID"]
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.InstanceNumber = str(k + 1)
    ds.AcquisitionNumber = "1"
    ds.ContentDate, ds.ContentTime = info["StudyDate"], info["StudyTime"]
    ds.KVP = ""
    _fill_plane(ds, geometry, k)
    normal = np.cross(geometry.direction_matrix[:, 0], geometry.direction_matrix[:, 1])
    ds.SliceLocation = _ds(np.dot(geometry.index_to_physical(np.array([[k, 0, 0]]))[0], normal))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = _ds(rescale[0]), _ds(rescale[1])
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


# ------------------------------------------------------------------------------------------------
# RTSTRUCT
# ------------------------------------------------------------------------------------------------
def _read_rt_object(path: PathLike, modality: str) -> Dataset:
    """A whole DICOM file that must be of ``modality``; anything else is an UnreadableInputError."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableInputError(f"{path} does not exist; give the path of the {modality} file")
    if _read_header(path) is None:
        raise UnreadableInputError(
            f"{path} is not a readable DICOM file (corrupt or not DICOM); give a valid {modality}"
        )
    ds = pydicom.dcmread(path, force=True)
    found = _text(ds, "Modality") or "missing"
    if found.upper() != modality:
        raise UnreadableInputError(
            f"{path} is not an {modality} file (its Modality is {found}); give the {modality} file"
        )
    return ds


@refuse_malformed("RTSTRUCT")
def read_rtstruct(
    path: PathLike, geometry: ImageGeometry, ct_meta: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """Rasterize the CLOSED_PLANAR contours of an RTSTRUCT onto ``geometry`` (the CT grid): ROI name -> bool mask.

    Each contour goes to the slice nearest its plane and is filled with voxel-centre inclusion; contours of
    one plane combine even-odd (XOR), so inner contours cut holes. ROIs without contours are skipped with a
    warning. When ``ct_meta`` gives a FrameOfReferenceUID that the RTSTRUCT does not reference, raises
    :class:`GeometryMismatchError`.
    """
    ds = _read_rt_object(path, "RTSTRUCT")
    if "StructureSetROISequence" not in ds:
        raise UnreadableInputError(f"{path} has no StructureSetROISequence; it is not a usable RTSTRUCT")
    _check_frame_of_reference(ds, ct_meta, Path(path))
    names = _roi_names(ds)
    contours_of = {int(item.ReferencedROINumber): item.get("ContourSequence") or []
                   for item in ds.get("ROIContourSequence", [])}
    masks: dict[str, np.ndarray] = {}
    for number, name in names.items():
        contours = contours_of.get(number, [])
        if not contours:
            warnings.warn(f"RTSTRUCT ROI '{name}' has no contours; it is skipped", stacklevel=2)
            continue
        masks[name] = _rasterize_roi(contours, geometry, name)
    return masks


def _check_frame_of_reference(ds: Dataset, ct_meta: Mapping[str, Any] | None, path: Path) -> None:
    ct_for = str((ct_meta or {}).get("FrameOfReferenceUID") or "")
    referenced = {_text(item, "FrameOfReferenceUID") for item in ds.get("ReferencedFrameOfReferenceSequence", [])}
    referenced |= {_text(item, "ReferencedFrameOfReferenceUID") for item in ds.StructureSetROISequence}
    referenced.discard("")
    if ct_for and referenced and ct_for not in referenced:
        raise GeometryMismatchError(
            f"{path} is drawn in frame of reference {', '.join(sorted(referenced))}, not the CT's {ct_for}; "
            "load the RTSTRUCT that belongs to this CT (or register the two first)"
        )


def _roi_names(ds: Dataset) -> dict[int, str]:
    """ROI number -> name; a repeated name gets its ROI number appended, so no ROI is lost."""
    names: dict[int, str] = {}
    for item in ds.StructureSetROISequence:
        number = int(item.ROINumber)
        name = _text(item, "ROIName").strip() or f"ROI_{number}"
        if name in names.values():
            warnings.warn(f"RTSTRUCT has two ROIs named '{name}'; the second is read as '{name}_{number}'",
                          stacklevel=3)
            name = f"{name}_{number}"
        names[number] = name
    return names


def _rasterize_roi(contours: Sequence[Dataset], geometry: ImageGeometry, name: str) -> np.ndarray:
    nz, ny, nx = geometry.shape
    mask = np.zeros(geometry.shape, dtype=bool)
    planes: dict[tuple[int, float], list[np.ndarray]] = {}
    skipped: dict[str, int] = {}
    for contour in contours:
        kind = _text(contour, "ContourGeometricType").upper()
        if kind not in ("CLOSED_PLANAR", "CLOSED_PLANAR_XOR"):
            skipped[kind or "untyped"] = skipped.get(kind or "untyped", 0) + 1
            continue
        points = np.asarray([float(v) for v in contour.ContourData], dtype=float).reshape(-1, 3)
        kji = geometry.physical_to_index(points)
        k = float(kji[:, 0].mean())
        if np.ptp(kji[:, 0]) > 0.5:
            skipped["not in a CT slice plane"] = skipped.get("not in a CT slice plane", 0) + 1
            continue
        if not -0.5 <= k < nz - 0.5 or len(points) < 3:
            continue
        planes.setdefault((int(round(k)), round(k, 2)), []).append(kji[:, [2, 1]])  # (i, j) polygon
    for (k, _), polygons in planes.items():
        mask[k] |= _fill_even_odd(polygons, ny, nx)  # XOR within a plane, OR across planes on one slice
    for kind, count in skipped.items():
        warnings.warn(f"RTSTRUCT ROI '{name}': {count} contour(s) skipped ({kind})", stacklevel=3)
    if not mask.any():
        warnings.warn(f"RTSTRUCT ROI '{name}' has no voxel inside the CT grid; its mask is empty", stacklevel=3)
    return mask


def _fill_even_odd(polygons: list[np.ndarray], ny: int, nx: int) -> np.ndarray:
    """Voxels whose centres lie inside an odd number of the (i, j) polygons."""
    out = np.zeros((ny, nx), dtype=bool)
    for polygon in polygons:
        i0, j0 = np.maximum(np.ceil(polygon.min(axis=0)).astype(int), 0)
        i1, j1 = np.minimum(np.floor(polygon.max(axis=0)).astype(int), (nx - 1, ny - 1))
        if i0 > i1 or j0 > j1:
            continue
        jj, ii = np.mgrid[j0:j1 + 1, i0:i1 + 1]
        closed = PolygonPath(np.vstack([polygon, polygon[:1]]), closed=True)
        inside = closed.contains_points(np.column_stack([ii.ravel(), jj.ravel()])).reshape(jj.shape)
        out[j0:j1 + 1, i0:i1 + 1] ^= inside
    return out


def _slice_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed (i, j) contours of a 2D mask through the edge midpoints between voxel centres.

    Marching squares at 0.5 on the zero-padded mask closes every contour and returns holes as their own
    contours, so even-odd filling at voxel centres reproduces the mask exactly.
    """
    rows, cols = np.nonzero(mask2d)
    if rows.size == 0:
        return []
    j0, i0 = rows.min(), cols.min()
    crop = np.pad(mask2d[j0:rows.max() + 1, i0:cols.max() + 1], 1).astype(np.float64)
    generator = contourpy.contour_generator(z=crop, line_type=contourpy.LineType.Separate)
    contours = []
    for line in generator.lines(0.5):
        if len(line) > 1 and np.allclose(line[0], line[-1]):
            line = line[:-1]
        line = _drop_collinear(line)
        if len(line) >= 3:
            contours.append(line + np.array([i0 - 1, j0 - 1], dtype=float))
    return contours


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """A closed ring without the points that lie on the straight line through their neighbours."""
    if len(ring) < 4:
        return ring
    before = ring - np.roll(ring, 1, axis=0)
    after = np.roll(ring, -1, axis=0) - ring
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return ring[np.abs(cross) > 1e-9]


_DEFAULT_COLORS = (
    (255, 0, 0), (0, 160, 255), (0, 200, 0), (255, 200, 0), (200, 0, 255), (255, 110, 0),
    (0, 220, 200), (255, 0, 150), (140, 90, 40), (120, 200, 255), (180, 255, 120), (255, 160, 200),
)


def _interpreted_type(name: str) -> str:
    if canonical_name(name) == "External":
        return "EXTERNAL"
    if is_target(name):
        return name.strip()[:3].upper()  # PTV, CTV, GTV, ITV are all defined terms
    return "ORGAN"


def _require_ct_reference(ct_meta: Mapping[str, Any], nz: int) -> list[str]:
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID") if not ct_meta.get(k)]
    if missing:
        raise DoseAIError(f"ct_meta lacks {', '.join(missing)}; pass what write_ct_series or read_ct_series returned")
    sop_uids = list(ct_meta.get("SOPInstanceUIDs") or [])
    if len(sop_uids) != nz:
        raise GeometryMismatchError(
            f"ct_meta lists {len(sop_uids)} CT slice UIDs but the grid has {nz} slices; pass the metadata of this CT"
        )
    return sop_uids


def write_rtstruct(
    masks: Mapping[str, np.ndarray],
    geometry: ImageGeometry,
    ct_meta: Mapping[str, Any],
    path: PathLike,
    colors: Mapping[str, Sequence[int]] | None = None,
    force: bool = False,
) -> str:
    """Write ``masks`` (name -> bool [z, y, x] on the CT grid) as an RTSTRUCT of the CT described by ``ct_meta``.

    ``ct_meta`` is what :func:`write_ct_series` or :func:`read_ct_series` returned (study, series, frame of
    reference and per-slice SOPInstanceUIDs). Colours are RGB 0-255 by name. Returns the SOPInstanceUID.
    """
    path = Path(path)
    refuse_overwrite(path, force)
    sop_uids = _require_ct_reference(ct_meta, geometry.shape[0])
    info = _study_info(ct_meta)
    ds = _new_dataset(RT_STRUCTURE_SET_STORAGE, generate_uid())
    _fill_patient_study(ds, info)
    _fill_series(ds, "RTSTRUCT", generate_uid(), "2", "DoseAI structures")
    ds.FrameOfReferenceUID = str(ct_meta["FrameOfReferenceUID"])  # the Frame of Reference module (C.7.4.1)
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = "1"
    ds.StructureSetLabel = "DoseAI"
    ds.StructureSetDate, ds.StructureSetTime = _now()
    ds.ReferencedFrameOfReferenceSequence = _referenced_frame(ct_meta, sop_uids)
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = (
        DicomSequence(), DicomSequence(), DicomSequence())
    for number, (name, mask) in enumerate(masks.items(), start=1):
        mask = _check_on_grid(mask, geometry, f"structure '{name}'").astype(bool)
        mask, grid = _right_handed(mask, geometry)  # slice k is then the k-th written CT slice
        color = (colors or {}).get(name) or _DEFAULT_COLORS[(number - 1) % len(_DEFAULT_COLORS)]
        _add_roi(ds, number, name, mask, grid, sop_uids, str(ct_meta["FrameOfReferenceUID"]), color)
    _save(ds, path)
    return str(ds.SOPInstanceUID)


def _image_ref(sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def _referenced_frame(ct_meta: Mapping[str, Any], sop_uids: list[str]) -> DicomSequence:
    series = Dataset()
    series.SeriesInstanceUID = str(ct_meta["SeriesInstanceUID"])
    series.ContourImageSequence = DicomSequence([_image_ref(uid) for uid in sop_uids])
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = str(ct_meta["StudyInstanceUID"])
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = str(ct_meta["FrameOfReferenceUID"])
    frame.RTReferencedStudySequence = DicomSequence([study])
    return DicomSequence([frame])


def _add_roi(
    ds: Dataset, number: int, name: str, mask: np.ndarray, geometry: ImageGeometry, sop_uids: list[str],
    frame_uid: str, color: Sequence[int],
) -> None:
    roi = Dataset()
    roi.ROINumber = str(number)
    roi.ReferencedFrameOfReferenceUID = frame_uid
    roi.ROIName = name
    roi.ROIGenerationAlgorithm = ""
    ds.StructureSetROISequence.append(roi)

    item = Dataset()
    item.ROIDisplayColor = [str(int(c)) for c in color]
    item.ReferencedROINumber = str(number)
    contours = []
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        for ring in _slice_contours(mask[k]):
            kji = np.column_stack([np.full(len(ring), float(k)), ring[:, 1], ring[:, 0]])
            contour = Dataset()
            contour.ContourImageSequence = DicomSequence([_image_ref(sop_uids[k])])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = str(len(ring))
            contour.ContourNumber = str(len(contours) + 1)
            contour.ContourData = _ds_list(geometry.index_to_physical(kji))
            contours.append(contour)
    if contours:
        item.ContourSequence = DicomSequence(contours)
    else:
        warnings.warn(f"structure '{name}' is empty; it is written without contours", stacklevel=3)
    ds.ROIContourSequence.append(item)

    observation = Dataset()
    observation.ObservationNumber = str(number)
    observation.ReferencedROINumber = str(number)
    observation.RTROIInterpretedType = _interpreted_type(name)
    observation.ROIInterpreter = ""
    ds.RTROIObservationsSequence.append(observation)


# ------------------------------------------------------------------------------------------------
# RTDOSE
# ------------------------------------------------------------------------------------------------
def write_rtdose(
    dose_gy: np.ndarray,
    geometry: ImageGeometry,
    path: PathLike,
    reference_meta: Mapping[str, Any] | None = None,
    force: bool = False,
    plan: "PlanDescription | None" = None,
) -> str:
    """Write ``dose_gy`` as a multi-frame RT Dose (uint32, DoseGridScaling, GY, PHYSICAL, PLAN) and, unless
    ``reference_meta`` names its plan (``RTPlanSOPInstanceUID``), an RTPLAN beside it
    (:func:`doseai.io.rtplan.rtplan_path_for`; ``plan``, by default a predicted dose's plan without beams).

    ``reference_meta`` (CT metadata or ``PlanningCase.metadata``) supplies the patient, StudyInstanceUID and
    FrameOfReferenceUID so the dose lands on the CT; without it new UIDs are made. Its ``RTStructSOPInstanceUID``
    is referenced by the dose and the plan. Returns the RTDOSE's SOPInstanceUID.
    """
    from doseai.io.rtplan import PlanDescription, rtplan_path_for, write_rtplan

    dose = validate_dose(_check_on_grid(dose_gy, geometry, "dose"))
    path = Path(path)
    reference = dict(reference_meta or {})
    plan_path = None if reference.get("RTPlanSOPInstanceUID") else rtplan_path_for(path)
    for output in (path, plan_path):  # both checked before either is written
        if output is not None:
            refuse_overwrite(output, force)
    dose, geometry = _right_handed(dose, geometry)
    info = _study_info(reference)
    # one study and frame of reference for the dose and its plan, even when the reference brings none
    reference.update({key: info[key] for key in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate",
                                                 "StudyTime", "StudyID", "FrameOfReferenceUID")})
    if plan_path is not None:
        reference["RTPlanSOPInstanceUID"] = write_rtplan(plan_path, reference, plan or PlanDescription(), force)
    ds = _new_dataset(RT_DOSE_STORAGE, generate_uid())
    _fill_patient_study(ds, info)
    _fill_series(ds, "RTDOSE", generate_uid(), "3", str(reference.get("DoseDescription") or "DoseAI dose"))
    ds.FrameOfReferenceUID = info["FrameOfReferenceUID"]
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = "1"
    ds.ContentDate, ds.ContentTime = _now()
    _fill_plane(ds, geometry)
    ds.NumberOfFrames = str(geometry.shape[0])
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)  # GridFrameOffsetVector
    ds.GridFrameOffsetVector = _ds_list(np.arange(geometry.shape[0]) * geometry.spacing[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "PLAN"
    scaling = _dose_scaling(float(dose.max(initial=0.0)))
    ds.DoseGridScaling = _ds(scaling)
    pixels = np.clip(np.round(dose.astype(np.float64) / float(ds.DoseGridScaling)), 0, UINT32_MAX).astype("<u4")
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    _add_dose_references(ds, reference)
    _save(ds, path)
    return str(ds.SOPInstanceUID)


def _dose_scaling(max_gy: float) -> float:
    """Gy per pixel unit so that the maximum dose maps to nearly the top of the uint32 range."""
    if max_gy <= 0:
        return 1.0
    scaling = max_gy / (UINT32_MAX * 0.999)  # headroom so the rounded DS value never pushes max off the range
    return float(_ds(scaling))


def _add_dose_references(ds: Dataset, reference: Mapping[str, Any]) -> None:
    for key, sop_class, keyword in (
        ("RTPlanSOPInstanceUID", RT_PLAN_STORAGE, "ReferencedRTPlanSequence"),
        ("RTStructSOPInstanceUID", RT_STRUCTURE_SET_STORAGE, "ReferencedStructureSetSequence"),
    ):
        if reference.get(key):
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = str(reference[key])
            setattr(ds, keyword, DicomSequence([item]))


@refuse_malformed("RTDOSE")
def read_rtdose(path: PathLike) -> tuple[np.ndarray, ImageGeometry, dict[str, Any]]:
    """Read an RTDOSE file: float32 dose in Gy [z, y, x] on its own grid, and its metadata.

    Frames are placed with GridFrameOffsetVector along the plane normal (relative offsets, or absolute
    ones whose first value is the first frame's position); decreasing offsets are reordered.
    """
    ds = _read_rt_object(path, "RTDOSE")
    what = f"RTDOSE {path}"
    try:
        pixels = ds.pixel_array.astype(np.float64)
    except Exception as error:  # noqa: BLE001
        raise UnreadableInputError(
            f"cannot decode the dose grid of {path} ({error}); export it uncompressed"
        ) from error
    pixels = pixels[None] if pixels.ndim == 2 else pixels
    row, col, normal = _plane_vectors(ds, what)
    offsets = _frame_offsets(ds, pixels.shape[0])
    order = np.argsort(offsets, kind="stable")
    pixels, offsets = pixels[order], offsets[order]
    dz = _uniform_step(offsets, what) or float(ds.get("SliceThickness") or 1.0)
    origin = np.asarray([float(v) for v in ds.ImagePositionPatient]) + offsets[0] * normal
    geometry = ImageGeometry(
        shape=pixels.shape, spacing=(*_pixel_spacing(ds, what), dz), origin=tuple(origin),
        direction=tuple(np.column_stack([row, col, normal]).ravel()),
    )
    dose = pixels * float(ds.get("DoseGridScaling") or 1.0)
    units = _text(ds, "DoseUnits").upper()
    if units == "CGY":
        dose /= 100.0
    elif units not in ("GY", ""):
        warnings.warn(f"{path}: DoseUnits is {units}, not GY; values are returned unconverted", stacklevel=2)
    meta = _meta_of(ds)
    meta.update({key: _text(ds, key) for key in ("SOPInstanceUID", "DoseUnits", "DoseType", "DoseSummationType")})
    plans = ds.get("ReferencedRTPlanSequence") or []
    meta["RTPlanSOPInstanceUID"] = _text(plans[0], "ReferencedSOPInstanceUID") if plans else ""
    return dose.astype(np.float32), geometry, meta


def _frame_offsets(ds: Dataset, frames: int) -> np.ndarray:
    """Frame positions along the normal relative to ImagePositionPatient."""
    if frames == 1:
        return np.zeros(1)
    try:
        offsets = np.asarray([float(v) for v in ds.GridFrameOffsetVector], dtype=float)
    except (AttributeError, TypeError, ValueError) as error:
        raise UnreadableInputError(f"multi-frame RTDOSE without a valid GridFrameOffsetVector ({error})") from error
    if offsets.size != frames:
        raise UnreadableInputError(
            f"RTDOSE GridFrameOffsetVector has {offsets.size} values for {frames} frames; the file is inconsistent"
        )
    return offsets - offsets[0]  # absolute offsets (first value non-zero) start at the first frame's position


# ------------------------------------------------------------------------------------------------
# whole cases
# ------------------------------------------------------------------------------------------------
def _referenced_series(rtstruct: _Entry) -> set[str]:
    uids = set()
    for frame in rtstruct.header.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                uids.add(_text(series, "SeriesInstanceUID"))
    return uids


def _frames_of(rtstruct: _Entry) -> set[str]:
    frames = {_text(f, "FrameOfReferenceUID") for f in rtstruct.header.get("ReferencedFrameOfReferenceSequence", [])}
    return frames - {""}


def _newest(entries: list[_Entry], what: str, folder: Path) -> _Entry:
    """The most recently created of several candidates, with a warning saying which was taken."""
    def stamp(e: _Entry) -> str:
        return (e.get("StructureSetDate") + e.get("StructureSetTime")) or (
            e.get("InstanceCreationDate") + e.get("InstanceCreationTime"))
    chosen = max(entries, key=stamp)
    if len(entries) > 1:
        warnings.warn(f"{folder} holds {len(entries)} {what}s for the CT; using {chosen.path.name}", stacklevel=3)
    return chosen


def _struct_ct_pairs(
    structs: list[_Entry], groups: dict[str, list[_Entry]], by_frame: bool
) -> list[tuple[str, _Entry]]:
    """(CT series UID, RTSTRUCT) pairs where the RTSTRUCT names the series (or, by_frame, its frame of reference)."""
    pairs = []
    for struct in structs:
        references = _frames_of(struct) if by_frame else _referenced_series(struct)
        for uid, slices in groups.items():
            if (slices[0].get("FrameOfReferenceUID") if by_frame else uid) in references:
                pairs.append((uid, struct))
    return pairs


def _choose_ct_and_rtstruct(scan: _Scan) -> tuple[list[_Entry], _Entry | None]:
    """The CT series an RTSTRUCT refers to (by series, else by frame of reference), and that RTSTRUCT."""
    groups = _ct_series_groups(scan)
    structs = scan.of("RTSTRUCT")
    for by_frame in (False, True):
        pairs = _struct_ct_pairs(structs, groups, by_frame)
        if pairs:
            uid = max({u for u, _ in pairs}, key=lambda u: len(groups[u]))
            return groups[uid], _newest([s for u, s in pairs if u == uid], "RTSTRUCT", scan.folder)
    ct = _pick_ct_series(scan)
    if structs:
        warnings.warn(f"no RTSTRUCT in {scan.folder} refers to its CT series; reading the CT without structures",
                      stacklevel=3)
    else:
        warnings.warn(f"no RTSTRUCT in {scan.folder}; the case has no structures", stacklevel=3)
    return ct, None


def _choose_rtdose(scan: _Scan, frame_uid: str) -> _Entry | None:
    doses = scan.of("RTDOSE")
    same_frame = [d for d in doses if d.get("FrameOfReferenceUID") == frame_uid]
    if doses and not same_frame:
        warnings.warn(f"RTDOSE in {scan.folder} is in another frame of reference than the CT; it is ignored",
                      stacklevel=3)
        return None
    if not same_frame:
        return None
    plans = [d for d in same_frame if d.get("DoseSummationType").upper() == "PLAN"] or same_frame
    if len(plans) > 1:
        warnings.warn(f"{scan.folder} holds {len(plans)} RTDOSE files for the CT; using {plans[0].path.name}",
                      stacklevel=3)
    return plans[0]


@refuse_malformed("DICOM case")
def read_dicom_case(
    folder: PathLike,
    overrides: Mapping[str, str | None] | None = None,
    prescriptions: Mapping[str, float] | None = None,
) -> PlanningCase:
    """A PlanningCase from a DICOM folder tree: the CT series, the RTSTRUCT that refers to it, and an RTDOSE
    in the same frame of reference (resampled linearly onto the CT grid when on another grid).

    Structure names are matched to canonical ones (``overrides``: raw -> canonical or None); prescriptions
    come from target names unless given. ``metadata`` keeps the DICOM UIDs for exporting an RTDOSE.
    """
    scan = _scan(folder)
    ct_entries, rtstruct = _choose_ct_and_rtstruct(scan)
    ct, geometry, ct_meta = _read_ct_entries(ct_entries)
    masks = read_rtstruct(rtstruct.path, geometry, ct_meta) if rtstruct else {}
    metadata = {key: str(ct_meta[key]) for key in _PATIENT_STUDY_KEYS + ("SeriesInstanceUID", "FrameOfReferenceUID")
                if ct_meta.get(key)}
    metadata["DicomFolder"] = str(Path(folder))
    if rtstruct:
        metadata["RTStructSOPInstanceUID"] = rtstruct.get("SOPInstanceUID")
    dose = None
    dose_entry = _choose_rtdose(scan, ct_meta["FrameOfReferenceUID"])
    if dose_entry is not None:
        dose_gy, dose_geometry, dose_meta = read_rtdose(dose_entry.path)
        dose = np.clip(resample_to(dose_gy, dose_geometry, geometry), 0.0, None)
        metadata["RTDoseSOPInstanceUID"] = dose_meta["SOPInstanceUID"]
    return PlanningCase.from_named_masks(
        geometry, masks, ct=ct, dose=dose, overrides=overrides, prescriptions=prescriptions,
        patient_id=ct_meta.get("PatientID") or "anonymous", metadata=metadata,
    )


def write_dicom_case(case: PlanningCase, folder: PathLike, force: bool = False) -> dict[str, Any]:
    """Write ``case`` as ``folder/CT/CT_*.dcm``, ``folder/RS.dcm`` (structures), ``folder/RD.dcm`` (dose) and
    ``folder/RP.dcm`` (the dose's plan, see :func:`write_rtdose`).

    A folder that already holds DICOM files is refused unless ``force`` (then those three are replaced, and
    an RS/RD left from an earlier write that this case has no counterpart for is removed).

    Patient, study and frame-of-reference UIDs in ``case.metadata`` are reused, so the RTSTRUCT and RTDOSE
    sit with the original study; the CT gets a new series (its instances are new files, and reusing the old
    series UID would mix two copies in a DICOM database). Returns the paths written and the UIDs used.
    """
    from doseai.io.rtplan import PlanDescription

    if case.ct is None:
        raise DoseAIError("the case has no CT; DICOM structures and dose need a CT series to refer to")
    folder = Path(folder)
    ct_folder, rs_path, rd_path, rp_path = folder / "CT", folder / "RS.dcm", folder / "RD.dcm", folder / "RP.dcm"
    if not force and folder.is_dir():  # checked first so that nothing is half written
        existing = [p for p in folder.rglob("*") if p.is_file() and _looks_like_dicom_file(p)]
        if existing:
            raise OutputExistsError(
                f"{folder} already holds DICOM files ({existing[0].name}, ...); choose an empty folder or pass "
                "force=True (--force)"
            )
    reference = {**case.metadata, "PatientID": case.metadata.get("PatientID") or case.patient_id}
    reference.pop("SeriesInstanceUID", None)
    ct_meta = write_ct_series(case.ct, case.geometry, ct_folder, meta=reference, force=force)
    written: dict[str, Any] = {
        "ct_files": ct_meta["files"], "rtstruct": None, "rtdose": None,
        **{key: ct_meta[key] for key in _PATIENT_STUDY_KEYS + ("FrameOfReferenceUID",) if ct_meta.get(key)},
        "CTSeriesInstanceUID": ct_meta["SeriesInstanceUID"],
    }
    for path, kept in ((rs_path, bool(case.structures)), (rd_path, case.dose is not None),
                       (rp_path, case.dose is not None)):
        if force and not kept and path.is_file():
            path.unlink()  # a stale RS/RD of an earlier write would otherwise be read with this CT
    if case.structures:
        written["RTStructSOPInstanceUID"] = write_rtstruct(
            case.structures, case.geometry, ct_meta, rs_path, force=force
        )
        written["rtstruct"] = str(rs_path)
    if case.dose is not None:
        dose_reference = {**ct_meta, "RTStructSOPInstanceUID": written.get("RTStructSOPInstanceUID", "")}
        plan = PlanDescription(prescriptions=dict(case.prescriptions))
        written["RTDoseSOPInstanceUID"] = write_rtdose(case.dose, case.geometry, rd_path, dose_reference, force=force,
                                                       plan=plan)
        written["rtdose"], written["rtplan"] = str(rd_path), str(rp_path)
    return written
