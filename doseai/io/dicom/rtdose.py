"""RTDOSE: a multi-frame dose grid in Gy, written with the RTPLAN it belongs to and read onto its own grid."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag

from doseai.case import validate_dose
from doseai.errors import UnreadableInputError, refuse_malformed, refuse_overwrite
from doseai.geometry import ImageGeometry
from doseai.io.dicom.reading import (PathLike, meta_of, pixel_spacing, plane_vectors, read_rt_object, text_of,
                                     uniform_step)
from doseai.io.dicom.rtplan import PlanDescription, rtplan_path_for, write_rtplan
from doseai.io.dicom.writing import (RT_DOSE_STORAGE, RT_PLAN_STORAGE, RT_STRUCTURE_SET_STORAGE, UINT32_MAX,
                                     check_on_grid, decimal_string, decimal_strings, fill_plane, new_instance, now,
                                     right_handed, save_dataset, study_info)


def write_rtdose(dose_gy: np.ndarray, geometry: ImageGeometry, path: PathLike,
                 reference_meta: Mapping[str, Any] | None = None, force: bool = False,
                 plan: PlanDescription | None = None) -> str:
    """Write ``dose_gy`` as a multi-frame RT Dose (uint32, DoseGridScaling, GY, PHYSICAL, PLAN) and, unless
    ``reference_meta`` names its plan (``RTPlanSOPInstanceUID``), an RTPLAN beside it
    (:func:`doseai.io.dicom.rtplan_path_for`; ``plan``, by default a predicted dose's plan without beams).

    ``reference_meta`` (CT metadata or ``PlanningCase.metadata``) supplies the patient, StudyInstanceUID and
    FrameOfReferenceUID so the dose lands on the CT; without it new UIDs are made. Its ``RTStructSOPInstanceUID``
    is referenced by the dose and the plan. Returns the RTDOSE's SOPInstanceUID.
    """
    dose = validate_dose(check_on_grid(dose_gy, geometry, "dose"))
    path = Path(path)
    reference = dict(reference_meta or {})
    plan_path = None if reference.get("RTPlanSOPInstanceUID") else rtplan_path_for(path)
    for output in (path, plan_path):  # both checked before either is written
        if output is not None:
            refuse_overwrite(output, force)
    dose, geometry = right_handed(dose, geometry)
    info = study_info(reference)
    # one study and frame of reference for the dose and its plan, even when the reference brings none
    reference.update({key: info[key] for key in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate",
                                                 "StudyTime", "StudyID", "FrameOfReferenceUID")})
    if plan_path is not None:
        reference["RTPlanSOPInstanceUID"] = write_rtplan(plan_path, reference, plan or PlanDescription(), force)
    ds = new_instance(RT_DOSE_STORAGE, info, "RTDOSE", "3", str(reference.get("DoseDescription") or "DoseAI dose"))
    ds.ContentDate, ds.ContentTime = now()
    fill_plane(ds, geometry)
    ds.NumberOfFrames = str(geometry.shape[0])
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)  # GridFrameOffsetVector
    ds.GridFrameOffsetVector = decimal_strings(np.arange(geometry.shape[0]) * geometry.spacing[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "PLAN"
    scaling = _dose_scaling(float(dose.max(initial=0.0)))
    ds.DoseGridScaling = decimal_string(scaling)
    pixels = np.clip(np.round(dose.astype(np.float64) / float(ds.DoseGridScaling)), 0, UINT32_MAX).astype("<u4")
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    _add_dose_references(ds, reference)
    save_dataset(ds, path)
    return str(ds.SOPInstanceUID)


def _dose_scaling(max_gy: float) -> float:
    """Gy per pixel unit so that the maximum dose maps to nearly the top of the uint32 range."""
    if max_gy <= 0:
        return 1.0
    scaling = max_gy / (UINT32_MAX * 0.999)  # headroom so the rounded DS value never pushes max off the range
    return float(decimal_string(scaling))


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
    ds = read_rt_object(path, "RTDOSE")
    what = f"RTDOSE {path}"
    try:
        pixels = ds.pixel_array.astype(np.float64)
    except Exception as error:  # noqa: BLE001
        raise UnreadableInputError(
            f"cannot decode the dose grid of {path} ({error}); export it uncompressed"
        ) from error
    pixels = pixels[None] if pixels.ndim == 2 else pixels
    row, col, normal = plane_vectors(ds, what)
    offsets = _frame_offsets(ds, pixels.shape[0])
    order = np.argsort(offsets, kind="stable")
    pixels, offsets = pixels[order], offsets[order]
    dz = uniform_step(offsets, what) or float(ds.get("SliceThickness") or 1.0)
    origin = np.asarray([float(v) for v in ds.ImagePositionPatient]) + offsets[0] * normal
    geometry = ImageGeometry(
        shape=pixels.shape, spacing=(*pixel_spacing(ds, what), dz), origin=tuple(origin),
        direction=tuple(np.column_stack([row, col, normal]).ravel()),
    )
    dose = pixels * float(ds.get("DoseGridScaling") or 1.0)
    units = text_of(ds, "DoseUnits").upper()
    if units == "CGY":
        dose /= 100.0
    elif units not in ("GY", ""):
        warnings.warn(f"{path}: DoseUnits is {units}, not GY; values are returned unconverted", stacklevel=2)
    meta = meta_of(ds)
    meta.update({key: text_of(ds, key) for key in ("SOPInstanceUID", "DoseUnits", "DoseType", "DoseSummationType")})
    plans = ds.get("ReferencedRTPlanSequence") or []
    meta["RTPlanSOPInstanceUID"] = text_of(plans[0], "ReferencedSOPInstanceUID") if plans else ""
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
