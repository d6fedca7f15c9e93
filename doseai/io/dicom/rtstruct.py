"""RTSTRUCT: CLOSED_PLANAR contours read onto the CT grid as masks, and masks written as contours.

Contours run through the edge midpoints between voxel centres (marching squares at level 0.5) and are read back
by even-odd filling with voxel-centre inclusion, so a mask written here comes back voxel for voxel, holes included.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import contourpy
import numpy as np
from matplotlib.path import Path as PolygonPath
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from doseai.errors import DoseAIError, GeometryMismatchError, UnreadableInputError, refuse_malformed, refuse_overwrite
from doseai.geometry import ImageGeometry
from doseai.io.dicom.reading import PathLike, read_rt_object, text_of
from doseai.io.dicom.writing import (CT_IMAGE_STORAGE, DETACHED_STUDY_MANAGEMENT, RT_STRUCTURE_SET_STORAGE,
                                     check_on_grid, decimal_strings, new_instance, now, right_handed, save_dataset,
                                     study_info)
from doseai.structures import canonical_name, is_target


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
    ds = read_rt_object(path, "RTSTRUCT")
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
    referenced = {text_of(item, "FrameOfReferenceUID") for item in ds.get("ReferencedFrameOfReferenceSequence", [])}
    referenced |= {text_of(item, "ReferencedFrameOfReferenceUID") for item in ds.StructureSetROISequence}
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
        name = text_of(item, "ROIName").strip() or f"ROI_{number}"
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
        kind = text_of(contour, "ContourGeometricType").upper()
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
    info = study_info(ct_meta)
    ds = new_instance(RT_STRUCTURE_SET_STORAGE, info, "RTSTRUCT", "2", "DoseAI structures")  # in the CT's frame
    ds.StructureSetLabel = "DoseAI"
    ds.StructureSetDate, ds.StructureSetTime = now()
    ds.ReferencedFrameOfReferenceSequence = _referenced_frame(ct_meta, sop_uids)
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = (
        DicomSequence(), DicomSequence(), DicomSequence())
    for number, (name, mask) in enumerate(masks.items(), start=1):
        mask = check_on_grid(mask, geometry, f"structure '{name}'").astype(bool)
        mask, grid = right_handed(mask, geometry)  # slice k is then the k-th written CT slice
        color = (colors or {}).get(name) or _DEFAULT_COLORS[(number - 1) % len(_DEFAULT_COLORS)]
        _add_roi(ds, number, name, mask, grid, sop_uids, str(ct_meta["FrameOfReferenceUID"]), color)
    save_dataset(ds, path)
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
            contour.ContourData = decimal_strings(geometry.index_to_physical(kji))
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
