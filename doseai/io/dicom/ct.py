"""CT series: one CT Image Storage file per slice, read into float32 HU [z, y, x] and written from it."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from doseai.errors import DoseAIError, OutputExistsError, UnreadableInputError, refuse_malformed
from doseai.geometry import ImageGeometry
from doseai.io.dicom.reading import (POSITION_TOL_MM, Entry, PathLike, Scan, looks_like_dicom_file, meta_of,
                                     pixel_spacing, plane_vectors, scan_folder, uniform_step)
from doseai.io.dicom.writing import (CT_IMAGE_STORAGE, check_on_grid, decimal_string, fill_plane, new_instance,
                                     right_handed, save_dataset, study_info)


@refuse_malformed("DICOM CT series")
def read_ct_series(
    folder: PathLike, series_uid: str | None = None
) -> tuple[np.ndarray, ImageGeometry, dict[str, Any]]:
    """Read the CT series in ``folder`` (searched recursively) as float32 HU [z, y, x], its grid and metadata.

    With several CT series, ``series_uid`` picks one; otherwise the one with most slices is read (with a
    warning). ``meta`` holds patient/study/series attributes by DICOM keyword, ``SOPInstanceUIDs`` and
    ``files`` in slice order.
    """
    scan = scan_folder(folder)
    return read_ct_entries(pick_ct_series(scan, series_uid))


def ct_series_groups(scan: Scan) -> dict[str, list[Entry]]:
    """The CT files of ``scan`` by SeriesInstanceUID."""
    groups: dict[str, list[Entry]] = {}
    for entry in scan.of("CT"):
        groups.setdefault(entry.get("SeriesInstanceUID"), []).append(entry)
    return groups


def pick_ct_series(scan: Scan, series_uid: str | None = None) -> list[Entry]:
    """The files of CT series ``series_uid``, or of the largest series (with a warning when there are several)."""
    groups = ct_series_groups(scan)
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


def read_ct_entries(entries: list[Entry]) -> tuple[np.ndarray, ImageGeometry, dict[str, Any]]:
    """The slices of one series as (HU [z, y, x], grid, metadata), as :func:`read_ct_series` returns them."""
    first = entries[0].header
    what = f"CT series {first.get('SeriesInstanceUID', '?')}"
    row, col, normal = plane_vectors(first, what)
    spacing_xy = pixel_spacing(first, what)
    shape_yx = (int(first.Rows), int(first.Columns))
    for entry in entries:
        if "ImagePositionPatient" not in entry.header:
            raise UnreadableInputError(
                f"{entry.path} has no ImagePositionPatient (an enhanced multi-frame CT?); "
                "export the CT as single-frame slices"
            )
        e_row, e_col, _ = plane_vectors(entry.header, str(entry.path))
        if not (np.allclose(e_row, row, atol=1e-4) and np.allclose(e_col, col, atol=1e-4)
                and (int(entry.header.Rows), int(entry.header.Columns)) == shape_yx
                and np.allclose(pixel_spacing(entry.header, str(entry.path)), spacing_xy, atol=1e-4)):
            raise UnreadableInputError(
                f"{what}: slice {entry.path.name} differs from the others in orientation, size or pixel spacing; "
                "export the series again as one consistent image stack"
            )
    ipp = np.array([[float(v) for v in e.header.ImagePositionPatient] for e in entries])
    order = np.argsort(ipp @ normal, kind="stable")
    entries, ipp = [entries[i] for i in order], ipp[order]
    dz = uniform_step(ipp @ normal, what) or float(first.get("SliceThickness") or 1.0)
    _check_no_tilt(ipp, normal, what)
    direction = np.column_stack([row, col, normal])
    geometry = ImageGeometry(
        shape=(len(entries), *shape_yx), spacing=(*spacing_xy, dz), origin=tuple(ipp[0]),
        direction=tuple(direction.ravel()),
    )
    hu = np.stack([_slice_hu(e.path) for e in entries]).astype(np.float32, copy=False)
    meta = meta_of(first)
    meta["SOPInstanceUIDs"] = [e.get("SOPInstanceUID") for e in entries]
    meta["files"] = [str(e.path) for e in entries]
    return hu, geometry, meta


def _check_no_tilt(ipp: np.ndarray, normal: np.ndarray, what: str) -> None:
    """Slices must be stacked along their normal; a gantry-tilted (sheared) stack is refused."""
    if len(ipp) < 2:
        return
    offset = ipp[-1] - ipp[0]
    lateral = np.linalg.norm(offset - np.dot(offset, normal) * normal)
    if lateral > POSITION_TOL_MM + 1e-3 * np.linalg.norm(offset):
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
    slope = float(decimal_string((hi - lo) / 65000.0))
    return slope, float(decimal_string((hi + lo) / 2.0))


def _clear_own_slices(folder: Path, force: bool) -> None:
    """Refuse a folder with DICOM files unless ``force``; with it, remove earlier ``CT_*.dcm`` slices of ours
    so that no stale slice from a larger series is left to mix into the new one."""
    if not folder.is_dir():
        return
    existing = [p for p in folder.iterdir() if p.is_file() and looks_like_dicom_file(p)]
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
    ct = check_on_grid(ct_hu, geometry, "CT").astype(np.float32)
    if not np.isfinite(ct).all():
        raise DoseAIError("the CT contains NaN or infinite values; fix or mask them before writing DICOM")
    ct, geometry = right_handed(ct, geometry)
    folder = Path(folder)
    _clear_own_slices(folder, force)
    meta = dict(meta or {})
    info = study_info(meta)
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
        save_dataset(ds, path)
        files.append(str(path))
    return {**info, "SeriesInstanceUID": series_uid, "SOPInstanceUIDs": sop_uids, "files": files}


def _ct_slice(
    pixels: np.ndarray, geometry: ImageGeometry, k: int, info: Mapping[str, str], series_uid: str,
    sop_uid: str, meta: Mapping[str, Any], rescale: tuple[float, float],
) -> Dataset:
    ds = new_instance(CT_IMAGE_STORAGE, info, "CT", str(meta.get("SeriesNumber") or "1"),
                      str(meta.get("SeriesDescription") or "CT"), sop_uid=sop_uid, series_uid=series_uid,
                      instance_number=str(k + 1))
    ds.PatientPosition = str(meta.get("PatientPosition") or "")
    ds.Laterality = ""  # Type 2C of General Series: unknown, as for the whole head and neck
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.AcquisitionNumber = "1"
    ds.ContentDate, ds.ContentTime = info["StudyDate"], info["StudyTime"]
    ds.KVP = ""
    fill_plane(ds, geometry, k)
    normal = np.cross(geometry.direction_matrix[:, 0], geometry.direction_matrix[:, 1])
    ds.SliceLocation = decimal_string(np.dot(geometry.index_to_physical(np.array([[k, 0, 0]]))[0], normal))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = decimal_string(rescale[0]), decimal_string(rescale[1])
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds
