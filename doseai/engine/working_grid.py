"""The dose engines' working grid: an axis-aligned (identity direction) grid of about 5 mm voxels covering
the case's physical extent, and the way back to the case grid."""

from __future__ import annotations

import itertools

import numpy as np

from doseai.case import PlanningCase
from doseai.geometry import ImageGeometry
from doseai.resample import resample_to

WATER_HU = 0.0
AIR_HU = -1000.0


def working_geometry(geometry: ImageGeometry, spacing_mm: float | tuple[float, float, float] = 5.0,
                     region: np.ndarray | None = None, margin_mm: float = 10.0) -> ImageGeometry:
    """Axis-aligned grid with ``spacing_mm`` (x, y, z) covering the case grid's voxels (edge to edge),
    centred on it; with a ``region`` mask, only that region's bounding box plus ``margin_mm`` (the body:
    beyond it there is only air, which the engines would trace through for nothing)."""
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
    if np.any(spacing <= 0):
        raise ValueError(f"working-grid spacing must be positive, got {spacing_mm}")
    full = geometry.index_to_physical(np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in geometry.shape]))))
    low, high = full.min(axis=0), full.max(axis=0)
    if region is not None and region.any():  # the region's box plus the margin, within the case grid
        where = np.nonzero(region)
        corners = np.array(list(itertools.product(*[(int(w.min()) - 0.5, int(w.max()) + 0.5) for w in where])))
        points = geometry.index_to_physical(corners)
        low = np.maximum(low, points.min(axis=0) - margin_mm)
        high = np.minimum(high, points.max(axis=0) + margin_mm)
    size_xyz = np.maximum(1, np.ceil((high - low) / spacing - 1e-6)).astype(int)
    origin = (low + high) / 2 - (size_xyz - 1) / 2 * spacing
    return ImageGeometry(shape=tuple(int(n) for n in size_xyz[::-1]), spacing=tuple(spacing), origin=tuple(origin))


def body_mask(case: PlanningCase) -> np.ndarray | None:
    """Where the patient is: the 'External' structure, else the possible-dose mask, else None."""
    if "External" in case.structures and case.structures["External"].any():
        return case.structures["External"]
    if case.possible_dose_mask is not None and case.possible_dose_mask.any():
        return case.possible_dose_mask
    return None


def _resample_mask(mask: np.ndarray, source: ImageGeometry, target: ImageGeometry) -> np.ndarray:
    """Majority-like: linear interpolation of the 0/1 mask thresholded at 0.5; a structure that would
    vanish (thinner than the new voxels) falls back to nearest neighbour."""
    out = resample_to(mask.astype(np.float32), source, target, "linear") >= 0.5
    if mask.any() and not out.any():
        out = resample_to(mask.astype(np.float32), source, target, "nearest") > 0.5
    return out


def to_working_grid(case: PlanningCase, spacing_mm: float | tuple[float, float, float] = 5.0,
                    crop_to_body: bool = True) -> PlanningCase:
    """The case on its working grid (cropped to the body plus 10 mm when a body is known and
    ``crop_to_body``): CT linear (air outside the old grid), masks majority-like, the
    possible-dose mask nearest. A missing CT becomes water (0 HU) inside the body and air (-1000 HU)
    outside when a body ('External' or possible-dose mask) is known, water everywhere otherwise.
    Prescriptions, patient id and metadata are kept; a dose on the case is not carried over."""
    source = case.geometry
    target = working_geometry(source, spacing_mm, body_mask(case) if crop_to_body else None)
    structures = {name: _resample_mask(mask, source, target) for name, mask in case.structures.items()}
    possible = None
    if case.possible_dose_mask is not None:
        possible = resample_to(case.possible_dose_mask.astype(np.float32), source, target, "nearest") > 0.5
    if case.ct is not None:
        ct = resample_to(case.ct, source, target, "linear", default_value=AIR_HU)
    else:
        body = body_mask(case)
        if body is None:
            ct = np.full(target.shape, WATER_HU, np.float32)
        else:
            ct = np.where(_resample_mask(body, source, target), WATER_HU, AIR_HU).astype(np.float32)
    return PlanningCase(geometry=target, ct=ct, structures=structures, prescriptions=dict(case.prescriptions),
                        possible_dose_mask=possible, patient_id=case.patient_id,
                        metadata=dict(case.metadata))


def dose_to_case_grid(dose: np.ndarray, working: ImageGeometry, case_geometry: ImageGeometry) -> np.ndarray:
    """A working-grid dose (z, y, x) on the case grid, linear, 0 outside the working grid; float32 Gy."""
    dose = resample_to(np.asarray(dose, np.float32), working, case_geometry, "linear")
    return np.clip(dose, 0, None).astype(np.float32)
