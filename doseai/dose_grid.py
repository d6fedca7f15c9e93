"""A dose grid of its own: the case on a coarser grid aligned with the CT, as a planning system keeps an RTDOSE.

A clinical CT is 512 x 512 x 150-300 voxels of 0.7-1 mm; a dose lives on a 2-3 mm grid. The dose grid here bins
the CT grid by an integer factor per axis (the largest that keeps the voxel within ``spacing_mm``, rounded), over
the body's bounding box: its voxel corners fall on CT voxel corners, it shares the CT's direction and frame of
reference, and a structure's volume on it is exact: the blocks wholly inside count whole, and in a block partly
inside each of the structure's CT voxels counts as a point where the dose is read trilinearly (supersampling, the
way a TPS weighs boundary voxels in a DVH). Everything per slider change or DVH edit then runs
on the dose grid. A CT no finer than ``spacing_mm`` (e.g. OpenKBP's 3.9 x 3.9 x 2.5 mm) is its own dose grid.
"""

from __future__ import annotations

import numpy as np

from doseai.case import PlanningCase
from doseai.dvh import PartialVolume
from doseai.errors import DoseAIError
from doseai.geometry import ImageGeometry

DEFAULT_DOSE_GRID_MM = 2.5
BODY_HU = -400.0  # a CT without an External structure: the body is what is denser than this
MARGIN_VOXELS = 1  # dose voxels kept around the body, so the dose falls off inside the grid


def parse_dose_grid(text: str) -> float | None:
    """A dose grid spacing as a user gives it: mm (0.5 to 10), or 'ct' (None: the CT's own grid)."""
    if str(text).strip().lower() == "ct":
        return None
    try:
        mm = float(text)
    except ValueError:
        mm = float("nan")
    if not 0.5 <= mm <= 10:
        raise DoseAIError(f"'{text}': give the dose grid spacing in mm (0.5 to 10), or 'ct' for the CT's grid")
    return mm


def binning_factors(spacing_xyz, spacing_mm: float) -> tuple[int, int, int]:
    """Per axis (z, y, x), how many CT voxels one dose voxel spans: ``round(spacing_mm / CT spacing)``, at least 1."""
    if not np.isfinite(spacing_mm) or spacing_mm <= 0:
        raise DoseAIError(f"the dose grid spacing must be a positive number of mm, got {spacing_mm}")
    return tuple(max(1, int(round(spacing_mm / s))) for s in reversed(tuple(spacing_xyz)))


def _body(case: PlanningCase) -> np.ndarray:
    if "External" in case.structures and case.structures["External"].any():
        return case.structures["External"]
    if case.ct is None:
        return np.ones(case.geometry.shape, bool)
    return case.ct > BODY_HU


def _region(body: np.ndarray, factors: tuple[int, int, int]) -> tuple[slice, ...]:
    """The CT-grid index box of the body plus the margin, grown to whole blocks (and clipped to the CT: a block
    at the CT's edge may be partial, see :func:`_block_mean`)."""
    if not body.any():
        raise DoseAIError("the body is empty: no External structure and no CT voxel above "
                          f"{BODY_HU:g} HU, so there is nothing to put a dose grid on")
    slices = []
    for axis, (n, f) in enumerate(zip(body.shape, factors)):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(body.any(axis=other))
        start = max(0, (int(hit[0]) // f - MARGIN_VOXELS) * f)
        stop = min(n, (int(hit[-1]) // f + 1 + MARGIN_VOXELS) * f)
        slices.append(slice(start, stop))
    return tuple(slices)


def _block_mean(array: np.ndarray, factors: tuple[int, int, int], pad_mode: str = "edge") -> np.ndarray:
    """Mean over f_z x f_y x f_x blocks. A partial block at the far edge of the CT is padded by its own edge
    values (an image), or with zeros (``pad_mode`` "constant": a mask, which holds nothing beyond the CT)."""
    pad = [(0, (-n) % f) for n, f in zip(array.shape, factors)]
    if any(p for _, p in pad):
        array = np.pad(array, pad, mode=pad_mode)
    nz, ny, nx = (n // f for n, f in zip(array.shape, factors))
    fz, fy, fx = factors
    return array.reshape(nz, fz, ny, fy, nx, fx).mean(axis=(1, 3, 5), dtype=np.float32)


def dose_grid_geometry(ct_geometry: ImageGeometry, region: tuple[slice, ...],
                       factors: tuple[int, int, int]) -> ImageGeometry:
    """The grid of ``factors``-sized blocks of ``ct_geometry`` starting at ``region``'s corner: same direction,
    each dose voxel centred on its block."""
    corner = ct_geometry.index_to_physical(np.array([[r.start for r in region]], float))[0]
    spacing = tuple(s * f for s, f in zip(ct_geometry.spacing, reversed(factors)))
    # the block's centre lies (f - 1) / 2 CT voxels beyond its first voxel's centre, along each axis
    shift = np.array([(f - 1) / 2 * s for f, s in zip(reversed(factors), ct_geometry.spacing)])
    origin = corner + ct_geometry.direction_matrix @ shift
    shape = tuple(-(-(r.stop - r.start) // f) for r, f in zip(region, factors))
    return ImageGeometry(shape, spacing, tuple(origin), ct_geometry.direction)


def on_dose_grid(case: PlanningCase, spacing_mm: float | None = DEFAULT_DOSE_GRID_MM) -> PlanningCase:
    """``case`` on its dose grid (see the module docstring): CT averaged over each block, each structure's
    partial volume kept in ``partial_volumes`` and its mask where the fraction is at least one half
    (the structure holds the dose voxel's centre, about), the dose averaged too. ``spacing_mm`` None, or a CT
    already that coarse: the case itself."""
    if spacing_mm is None:
        return case
    factors = binning_factors(case.geometry.spacing, spacing_mm)
    if factors == (1, 1, 1):
        return case
    region = _region(_body(case), factors)
    geometry = dose_grid_geometry(case.geometry, region, factors)
    partials, fractions = {}, {}
    for name, mask in case.structures.items():
        partials[name], fractions[name] = _binned_structure(mask[region], factors)
    return PlanningCase(
        geometry=geometry,
        ct=None if case.ct is None else _block_mean(case.ct[region], factors),
        structures={name: _mask_of(fraction) for name, fraction in fractions.items()},
        prescriptions=dict(case.prescriptions),
        dose=None if case.dose is None else _block_mean(case.dose[region], factors),
        possible_dose_mask=None if case.possible_dose_mask is None
        else _block_mean(case.possible_dose_mask[region], factors) > 0,
        patient_id=case.patient_id,
        metadata=dict(case.metadata),
        partial_volumes={name: p for name, p in partials.items() if p.volume_voxels > 0},
    )


def partial_volume(mask: np.ndarray, factors: tuple[int, int, int]) -> PartialVolume:
    """The :class:`~doseai.dvh.PartialVolume` of a CT-grid ``mask`` on its blocks: the blocks wholly inside, and
    each CT voxel of the structure in a block partly inside as a point of weight 1 / (voxels per block), at its
    centre in block (dose-voxel) index units. Computed on the structure's bounding box only (a parotid's box is a
    few hundred thousand CT voxels of 67 million)."""
    return _binned_structure(mask, factors)[0]


def _binned_structure(mask: np.ndarray, factors: tuple[int, int, int]) -> tuple[PartialVolume, np.ndarray]:
    """(:func:`partial_volume` of ``mask``, the share of each block inside it), both from its bounding box."""
    shape = tuple(-(-n // f) for n, f in zip(mask.shape, factors))
    fraction = np.zeros(shape, np.float32)
    hit = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(h.size == 0 for h in hit):
        empty = PartialVolume(shape, np.zeros(0, np.int64), np.zeros((3, 0), np.float32), np.zeros(0, np.float32))
        return empty, fraction
    lo = [int(h[0]) // f for h, f in zip(hit, factors)]  # the box, in whole blocks
    hi = [int(h[-1]) // f + 1 for h, f in zip(hit, factors)]
    box = mask[tuple(slice(a * f, b * f) for a, b, f in zip(lo, hi, factors))]
    box_fraction = _block_mean(box, factors, "constant")
    fraction[tuple(slice(a, a + n) for a, n in zip(lo, box_fraction.shape))] = box_fraction
    inside_blocks = np.nonzero(box_fraction >= 1.0)
    inside = np.ravel_multi_index(tuple(inside_blocks[a] + lo[a] for a in range(3)), shape)
    # the structure's CT voxels in the blocks partly inside
    edge_block = (box_fraction > 0) & (box_fraction < 1.0)
    fine_edge = box & np.repeat(np.repeat(np.repeat(edge_block, factors[0], 0), factors[1], 1), factors[2], 2)[
        tuple(slice(0, n) for n in box.shape)]
    kji = np.nonzero(fine_edge)
    points = np.stack([(kji[a] + lo[a] * f + 0.5) / f - 0.5 for a, f in enumerate(factors)]).astype(np.float32)
    weights = np.full(points.shape[1], 1.0 / np.prod(factors), np.float32)
    return PartialVolume(shape, inside.astype(np.int64), points, weights), fraction


def _mask_of(fraction: np.ndarray) -> np.ndarray:
    """The voxels at least half inside; a structure thinner than that keeps its fullest voxels, so that it
    does not vanish from the model's inputs."""
    mask = fraction >= 0.5
    if not mask.any() and fraction.any():
        mask = fraction >= fraction.max()
    return mask
