"""Beam set-up: gantry angles, isocenter, and the bixel layout of each beam.

Geometry follows IEC 61217 for a head-first-supine patient in LPS: at gantry 0 the source is anterior
(at -y) and the beam runs towards +y (posterior); at gantry 90 the source is at the patient's left (+x)
and the beam runs towards -x. The couch turns about the vertical axis (LPS y). A beam's eye view (BEV)
has its x axis along LPS x and its y axis along LPS z (superior) at gantry 0 and couch 0, and turns with
the gantry. This is pyRadPlan's (matRad's) convention, which :mod:`doseai.engine.pyradplan_engine`
relies on, and PyDoseRT's for coplanar beams (checked in Testing/test_engine.py).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from doseai.case import PlanningCase
from doseai.engine.influence import BeamSet

SOURCE_AXIS_DISTANCE_MM = 1000.0


def target_union(case: PlanningCase) -> np.ndarray:
    """The union of the masks of all prescribed targets; raises MissingStructureError if there is none."""
    case.require_target()
    union = np.zeros(case.geometry.shape, dtype=bool)
    for name in case.targets:
        union |= case.structures[name]
    return union


def target_centroid_lps(case: PlanningCase) -> tuple[float, float, float]:
    """Centroid (LPS mm) of the union of the target masks, through the grid's direction/spacing/origin."""
    index = np.argwhere(target_union(case)).mean(axis=0)  # (k, j, i); the index->LPS map is affine
    return tuple(float(v) for v in case.geometry.index_to_physical(index[None, :])[0])


def default_beams(case: PlanningCase, n_beams: int = 9, bixel_width_mm: float = 5.0,
                  energy_mv: float = 6.0) -> BeamSet:
    """``n_beams`` equispaced coplanar beams (0, 360/n, ...: 0, 40, ..., 320 for 9, as in OpenKBP) with
    the isocenter at the centroid of the union of the targets."""
    if n_beams < 1:
        raise ValueError(f"n_beams must be at least 1, got {n_beams}")
    if bixel_width_mm <= 0:
        raise ValueError(f"bixel width must be positive, got {bixel_width_mm} mm")
    angles = tuple(float(360.0 * i / n_beams) for i in range(n_beams))
    return BeamSet(gantry_angles_deg=angles, isocenter_lps_mm=target_centroid_lps(case),
                   energy_mv=float(energy_mv), bixel_width_mm=float(bixel_width_mm))


def beam_rotation(gantry_deg: float, couch_deg: float = 0.0) -> np.ndarray:
    """3x3 matrix taking BEV coordinates (x lateral, y along the beam, z up the field) to LPS offsets
    from the isocenter; the source sits at BEV (0, -SAD, 0)."""
    g, c = np.deg2rad(gantry_deg), np.deg2rad(couch_deg)
    gantry = np.array([[np.cos(g), -np.sin(g), 0.0], [np.sin(g), np.cos(g), 0.0], [0.0, 0.0, 1.0]])
    couch = np.array([[np.cos(c), 0.0, np.sin(c)], [0.0, 1.0, 0.0], [-np.sin(c), 0.0, np.cos(c)]])
    return couch @ gantry


def bixel_layout(case: PlanningCase, beams: BeamSet, margin_mm: float | None = None,
                 sad_mm: float = SOURCE_AXIS_DISTANCE_MM) -> tuple[np.ndarray, np.ndarray]:
    """Bixels that see the target: ``(bixel_beam, bixel_position_mm)`` in beam order.

    The target union, grown by ``margin_mm`` (default: one bixel width, box-shaped, as matRad does), is
    projected from the source onto each beam's isocenter plane; every bixel-grid position hit is a bixel.
    Positions are BEV (x, y) in mm on a grid of ``beams.bixel_width_mm`` centred on the beam axis,
    sorted by x then y. Engines with their own beam geometry (pyRadPlan) report theirs instead.
    """
    width = beams.bixel_width_mm
    margin = width if margin_mm is None else float(margin_mm)
    target = target_union(case)
    if margin > 0:
        radius = np.ceil(margin / np.asarray(case.geometry.spacing[::-1])).astype(int)  # (z, y, x) voxels
        target = ndimage.binary_dilation(target, structure=np.ones(tuple(2 * radius + 1), bool))
    points = case.geometry.index_to_physical(np.argwhere(target)) - np.asarray(beams.isocenter_lps_mm)
    beam_of, positions = [], []
    for b, (gantry, couch) in enumerate(zip(beams.gantry_angles_deg, beams.couches)):
        bev = points @ beam_rotation(gantry, couch)  # rows: (x, depth, z) in BEV
        scale = sad_mm / (sad_mm + bev[:, 1])  # project along the divergent ray onto the isocenter plane
        plane = np.stack([bev[:, 0] * scale, bev[:, 2] * scale], axis=1)
        grid = np.unique(width * np.round(plane / width), axis=0)
        positions.append(grid)
        beam_of.append(np.full(len(grid), b, dtype=np.int64))
    return np.concatenate(beam_of), np.concatenate(positions).astype(np.float64)
