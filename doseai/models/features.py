"""Network inputs from a PlanningCase: the model grid, the input channels and the beam plate.

The model grid has a fixed voxel size and shape (from the model card). It is centred in-plane on the
body's bounding box and along z on the targets' bounding box, so that the same anatomy lands in the
same place whatever the source grid; with ``snap_to_case`` its origin then moves (by less than a case
voxel) onto a voxel centre of the case, so that where the two grids share a voxel size nothing is
interpolated on the way in or back. Channels (float32, [C, z, y, x]):
  ct           HU clipped to [-1000, 1500] / 1000
  target_dose  prescription of the target covering the voxel (highest wins) / norm_gy
  <OARs>       one occupancy channel per OpenKBP OAR (linear resampling of the mask: partial volume)
  body         the possible-dose mask (or External)
  beam_plate   fraction of the coplanar beams whose target projection covers the voxel (see beam_plate)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from doseai.case import PlanningCase
from doseai.errors import DoseAIError
from doseai.geometry import ImageGeometry
from doseai.resample import resample_to
from doseai.structures import OPENKBP_OARS

OPENKBP_GANTRY_DEG = tuple(range(0, 360, 40))  # 9 equispaced coplanar beams


@dataclass(frozen=True)
class GridSpec:
    """The model grid a network was trained on: its voxel count and spacing (its placement on a case is
    :func:`model_geometry`'s); stored in the model card under ``grid``."""

    shape: tuple[int, int, int]  # (nz, ny, nx)
    spacing: tuple[float, float, float]  # (x, y, z) mm
    # origin on a case voxel centre (see the module docstring). The models were trained without it (their
    # caches and Pareto plans are on the unsnapped grid); a card turns it on for prediction where measured
    # better: dose_preference_v1_1 on the 40 validation patients, dose / DVH score 3.971 / 2.862 -> 3.935 /
    # 2.739 Gy (in-plane the model voxel is OpenKBP's, so going to the grid and back becomes exact in-plane)
    snap_to_case: bool = False

    @classmethod
    def from_card(cls, card: dict) -> "GridSpec":
        """The grid of a model card (``card["grid"]``)."""
        return cls(shape=tuple(card["grid"]["shape_zyx"]), spacing=tuple(card["grid"]["spacing_xyz_mm"]),
                   snap_to_case=bool(card["grid"].get("snap_to_case_lattice", False)))


# The grid of the v1 models: OpenKBP's in-plane voxel (3.906 mm), 5 mm slices (half OpenKBP's z resolution),
# 128 x 80 x 64 voxels = 500 x 312 x 320 mm, which holds the body of 90 % of OpenKBP patients (shoulders of
# the widest are cut, where dose is low). Measured on 12 validation patients, going to this spacing and back
# costs ~0.8 Gy dose score, versus 1.5 Gy at 7.8 mm (64^3); it trains at ~20 s per epoch of the prior here.
DEFAULT_GRID = GridSpec(shape=(64, 80, 128), spacing=(3.906, 3.906, 5.0))


def with_slice_spacing(spec: GridSpec, slice_mm: float) -> GridSpec:
    """``spec`` with slices ``slice_mm`` apart and as many as keep its field along z (rounded to a whole slice)."""
    if not (np.isfinite(slice_mm) and slice_mm > 0):
        raise DoseAIError(f"slice spacing must be a positive number of mm, got {slice_mm}")
    n_slices = max(1, int(round(spec.shape[0] * spec.spacing[2] / slice_mm)))
    return replace(spec, shape=(n_slices, *spec.shape[1:]), spacing=(*spec.spacing[:2], float(slice_mm)))


# an OAR more than this many times larger (or smaller) than in any training case is flagged: most likely
# another structure under its name, which the network reads as that OAR
VOLUME_FACTOR_FLAGGED = 2.0
CT_CLIP_HU = (-1000.0, 1500.0)  # what the network reads (training clipped the same way)
PLAUSIBLE_HU = (-3100.0, 31000.0)  # beyond padding (-3024) and extended-range metal: not HU at all
OBLIQUE_NOTE_DEG = 0.5


def channel_names(oars=OPENKBP_OARS) -> list[str]:
    """The network's input channels in order: CT, target dose, one occupancy per OAR, body, beam plate."""
    return ["ct", "target_dose", *oars, "body", "beam_plate"]


def mirror_order(names: list[str]) -> list[int]:
    """Index order that mirrors named channels (or DVH rows) left-right: each ``X_L`` takes ``X_R``'s place and
    back, the rest stay. With the array flipped along x, this is the anatomy's mirror image."""
    order = list(range(len(names)))
    for index, name in enumerate(names):
        if name.endswith("_L") and name[:-2] + "_R" in names:
            twin = names.index(name[:-2] + "_R")
            order[index], order[twin] = twin, index
    return order


def _bbox_center(geometry: ImageGeometry, mask: np.ndarray) -> np.ndarray:
    """Physical (x, y, z) centre of the bounding box of ``mask`` (grid centre when empty)."""
    if mask is None or not mask.any():
        index = (np.array(geometry.shape) - 1) / 2.0
    else:
        nonzero = np.argwhere(mask)
        index = (nonzero.min(0) + nonzero.max(0)) / 2.0
    return geometry.index_to_physical(index[np.newaxis])[0]


def body_mask(case: PlanningCase) -> np.ndarray:
    """Where dose may be: the case's possible-dose mask, else its External structure, else the CT above
    -500 HU, else (no CT) the whole grid."""
    if case.possible_dose_mask is not None:
        return case.possible_dose_mask
    if "External" in case.structures:
        return case.structures["External"]
    return case.ct > -500 if case.ct is not None else np.ones(case.geometry.shape, bool)


def targets_mask(case: PlanningCase) -> np.ndarray:
    """Union of the case's targets (the structures with a prescription)."""
    targets = np.zeros(case.geometry.shape, bool)
    for name in case.prescriptions:
        targets |= case.mask(name)
    return targets


def target_dose_map(case: PlanningCase) -> np.ndarray:
    """Prescription (Gy) of the highest-dose target covering each voxel, 0 outside targets."""
    rx = np.zeros(case.geometry.shape, np.float32)
    for name in sorted(case.prescriptions, key=case.prescriptions.get):
        rx[case.mask(name)] = case.prescriptions[name]
    return rx


def model_geometry(case: PlanningCase, spec: GridSpec) -> ImageGeometry:
    """The model grid for ``case``: axis-aligned (identity direction) in LPS, placed as described above."""
    body_center = _bbox_center(case.geometry, body_mask(case))
    target_center = _bbox_center(case.geometry, targets_mask(case))
    center = np.array([body_center[0], body_center[1], target_center[2]])
    half_extent = (np.array(spec.shape[::-1]) - 1) / 2.0 * np.array(spec.spacing)
    origin = center - half_extent
    if spec.snap_to_case:
        nearest_voxel = np.round(case.geometry.physical_to_index(origin[np.newaxis]))
        origin = case.geometry.index_to_physical(nearest_voxel)[0]
    return ImageGeometry(shape=spec.shape, spacing=spec.spacing, origin=tuple(origin))


def beam_plate(targets: np.ndarray, geometry: ImageGeometry, gantry_deg=OPENKBP_GANTRY_DEG,
               margin_mm: float = 5.0) -> np.ndarray:
    """Fraction of coplanar parallel beams (rotating about z) whose target projection, widened by
    ``margin_mm``, covers each voxel: a cheap stand-in for the beam apertures of the plan.

    For a beam along direction d in the axial plane, a voxel is in the field when the target occupies
    the same slice at the same coordinate u perpendicular to d (beam divergence is ignored).
    """
    nz, ny, nx = geometry.shape
    sx, sy, _ = geometry.spacing
    bin_mm = min(sx, sy)
    x = (np.arange(nx) - (nx - 1) / 2) * sx
    y = (np.arange(ny) - (ny - 1) / 2) * sy
    xx, yy = np.meshgrid(x, y)  # [y, x]
    n_bins = int(np.ceil(np.hypot(x[-1] - x[0], y[-1] - y[0]) / bin_mm)) + 3
    pad = int(np.ceil(margin_mm / bin_mm))
    z_index = np.arange(nz)[:, None, None]
    plate = np.zeros(geometry.shape, np.float32)
    for angle in np.deg2rad(gantry_deg):
        u = np.floor((xx * np.cos(angle) + yy * np.sin(angle)) / bin_mm).astype(np.int64) + n_bins // 2
        flat = (z_index * n_bins + u[np.newaxis]).ravel()
        occupied = np.bincount(flat[targets.ravel()], minlength=nz * n_bins).reshape(nz, n_bins) > 0
        if pad:  # widen each slice's aperture by the margin
            occupied = np.apply_along_axis(lambda row: np.convolve(row, np.ones(2 * pad + 1), "same") > 0, 1, occupied)
        plate += occupied.ravel()[flat].reshape(geometry.shape)
    return plate / len(gantry_deg)


def case_features(case: PlanningCase, spec: GridSpec, norm_gy: float = 70.0, oars=OPENKBP_OARS
                  ) -> tuple[np.ndarray, ImageGeometry]:
    """(channels [C, z, y, x] float32 on the model grid, model grid geometry)."""
    grid = model_geometry(case, spec)
    source = case.geometry
    ct = case.ct if case.ct is not None else np.where(body_mask(case), 0.0, -1000.0)
    channels = [np.clip(resample_to(ct, source, grid, default_value=-1000.0), *CT_CLIP_HU) / 1000.0]
    target = resample_to(target_dose_map(case), source, grid, interpolation="nearest")
    channels.append(target / norm_gy)
    for name in oars:
        channels.append(resample_to(case.mask(name).astype(np.float32), source, grid))
    channels.append(resample_to(body_mask(case).astype(np.float32), source, grid))
    channels.append(beam_plate(target > 0, grid))
    return np.stack(channels).astype(np.float32), grid


def structure_volumes_cc(case: PlanningCase, names) -> dict[str, float]:
    """Volume (cc) of each of ``names`` that the case has and that is not empty."""
    voxel_cc = case.geometry.voxel_volume_mm3 / 1000.0
    return {name: float(case.structures[name].sum()) * voxel_cc
            for name in names if name in case.structures and case.structures[name].any()}


def unlike_training(case: PlanningCase, card: dict) -> list[str]:
    """One line per OAR whose volume lies far outside the training cases' (the card's
    ``inputs.training_volumes_cc``; nothing when the card has none)."""
    ranges = card.get("inputs", {}).get("training_volumes_cc", {})
    notes = []
    for name, volume in structure_volumes_cc(case, ranges).items():
        low, high = ranges[name]
        if volume > VOLUME_FACTOR_FLAGGED * high or volume < low / VOLUME_FACTOR_FLAGGED:
            notes.append(f"{name} is {volume:.0f} cc, against {low:.0f}-{high:.0f} cc in the training cases: check "
                         f"that this structure is the {name}; the network reads it as one, and the dose may be off")
    return notes


def ct_notes(case: PlanningCase) -> list[str]:
    """A line when the CT holds values no CT in HU has (the network reads HU clipped to [-1000, 1500], as
    in training, so such values are read as air or dense bone), and one when the CT grid is oblique."""
    notes = []
    if case.ct is not None:
        low, high = PLAUSIBLE_HU
        outside = (case.ct < low) | (case.ct > high)
        if outside.any():
            notes.append(f"the CT has {int(outside.sum())} voxel(s) outside {low:g} to {high:g} HU (min "
                         f"{float(case.ct.min()):.4g}, max {float(case.ct.max()):.4g}): is it in HU? The model "
                         f"reads HU clipped to [{CT_CLIP_HU[0]:g}, {CT_CLIP_HU[1]:g}], as in training")
    tilt = case.geometry.obliquity_deg()
    if tilt > OBLIQUE_NOTE_DEG:
        notes.append(f"the CT grid is oblique ({tilt:.1f} deg from the patient axes): the model runs on an "
                     "axis-aligned grid and the dose is resampled back onto the CT's grid")
    return notes


def share_outside_grid(mask: np.ndarray, source: ImageGeometry, grid: ImageGeometry) -> float:
    """Share of the voxels of ``mask`` (on ``source``) whose centres lie outside ``grid``'s field."""
    index = np.argwhere(mask)
    if index.size == 0:
        return 0.0
    kji = grid.physical_to_index(source.index_to_physical(index))
    outside = np.any((kji < -0.5) | (kji > np.array(grid.shape) - 0.5), axis=1)
    return float(outside.mean())


def outside_field(case: PlanningCase, grid: ImageGeometry) -> list[str]:
    """A line when part of the targets lies outside the model grid ``grid`` (the network's field: there the
    predicted dose is 0)."""
    share = share_outside_grid(targets_mask(case), case.geometry, grid)
    if share == 0:
        return []
    field_mm = " x ".join(f"{n * s:.0f}" for n, s in zip(grid.shape[::-1], grid.spacing))
    return [f"{share:.1%} of the target voxels lie outside the model's field ({field_mm} mm in x, y, z; centred on "
            "the body in-plane and on the targets along z): the predicted dose there is 0"]
