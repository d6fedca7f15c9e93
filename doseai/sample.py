"""A synthetic head-and-neck-like phantom, generated deterministically from a seed.

It is the embedded default case of the README's main command and of the tests: body, bone
(mandible, vertebra), PTV_70/PTV_63/PTV_56 with prescriptions, spinal cord, brainstem, parotids,
larynx, esophagus and mandible, on a grid close to OpenKBP's (about 4 x 4 x 2.5 mm).
``sample_dose`` adds a smooth plan-like dose (prescription inside each target, fall-off outside);
it is synthetic, not a treatment plan.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from doseai.case import PlanningCase
from doseai.geometry import ImageGeometry

SAMPLE_PRESCRIPTIONS = {"PTV_70": 70.0, "PTV_63": 63.0, "PTV_56": 56.0}


def _ellipsoid(zz, yy, xx, center, radii) -> np.ndarray:
    """Voxels inside an ellipsoid; center and radii in mm as (z, y, x)."""
    return ((zz - center[0]) / radii[0]) ** 2 + ((yy - center[1]) / radii[1]) ** 2 + (
        (xx - center[2]) / radii[2]
    ) ** 2 <= 1.0


def _cylinder(yy, xx, center, radii) -> np.ndarray:
    return ((yy - center[0]) / radii[0]) ** 2 + ((xx - center[1]) / radii[1]) ** 2 <= 1.0


def make_sample_case(
    seed: int = 0,
    shape: tuple[int, int, int] = (64, 96, 96),
    spacing_xyz: tuple[float, float, float] = (3.9, 3.9, 2.5),
    with_dose: bool = True,
) -> PlanningCase:
    """Build the phantom; the same seed gives the same case. ``shape`` is (nz, ny, nx)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    sx, sy, sz = spacing_xyz
    # coordinates in mm relative to the grid centre (LPS: +x left, +y posterior, +z superior)
    zz, yy, xx = np.meshgrid(
        (np.arange(nz) - (nz - 1) / 2) * sz,
        (np.arange(ny) - (ny - 1) / 2) * sy,
        (np.arange(nx) - (nx - 1) / 2) * sx,
        indexing="ij",
    )
    jitter = lambda scale: rng.uniform(-scale, scale)  # noqa: E731 - small per-seed anatomical variation
    half_height = nz * sz / 2

    # neck: elliptic cylinder that widens towards the head
    widen = 1.0 + 0.15 * np.clip(zz / half_height, -1, 1)
    body = _cylinder(yy, xx, (0.0, 0.0), (70.0 * widen + jitter(3), 85.0 * widen + jitter(3)))
    vertebra = _cylinder(yy, xx, (32.0, 0.0), (14.0, 16.0)) & (zz < half_height * 0.45)
    spinal_canal = _cylinder(yy, xx, (30.0 + jitter(1), jitter(1)), (6.0, 6.0))
    spinal_cord = spinal_canal & (zz < half_height * 0.45)
    vertebra &= ~spinal_canal
    brainstem = _ellipsoid(zz, yy, xx, (half_height * 0.7, 22.0, 0.0), (half_height * 0.3, 12.0, 13.0))
    # mandible: a horseshoe in the upper neck, opening posteriorly
    radial = np.hypot((yy + 10.0) / 55.0, xx / 60.0)
    mandible = (np.abs(radial - 1.0) < 0.12) & (yy < 15.0) & (np.abs(zz - half_height * 0.35) < 12.0)
    parotid_r = _ellipsoid(zz, yy, xx, (half_height * 0.45, 10.0, -58.0 + jitter(2)), (22.0, 16.0, 12.0))
    parotid_l = _ellipsoid(zz, yy, xx, (half_height * 0.45, 10.0, 58.0 + jitter(2)), (22.0, 16.0, 12.0))
    larynx = _ellipsoid(zz, yy, xx, (-half_height * 0.35, -35.0, 0.0), (22.0, 12.0, 15.0))
    esophagus = _cylinder(yy, xx, (10.0, 0.0), (6.0, 8.0)) & (zz < -half_height * 0.1)

    # targets: primary tumour (right oropharynx), a margin ring, bilateral nodal volumes
    primary_center = (half_height * 0.15 + jitter(4), -12.0 + jitter(3), -22.0 + jitter(4))
    ptv70 = _ellipsoid(zz, yy, xx, primary_center, (20.0 + jitter(3), 18.0, 18.0))
    ptv63 = _ellipsoid(zz, yy, xx, primary_center, (30.0, 27.0, 27.0)) & ~ptv70
    nodes = _ellipsoid(zz, yy, xx, (-half_height * 0.1, 0.0, -40.0), (40.0, 15.0, 12.0)) | _ellipsoid(
        zz, yy, xx, (-half_height * 0.1, 0.0, 40.0), (40.0, 15.0, 12.0)
    )
    ptv56 = nodes & ~ptv70 & ~ptv63
    # targets stay inside the body and out of the cord (a planner's crop)
    cord_prv = ndimage.binary_dilation(spinal_cord, iterations=2)
    ptv70, ptv63, ptv56 = (t & body & ~cord_prv for t in (ptv70, ptv63, ptv56))

    ct = np.full(shape, -1000.0, dtype=np.float32)
    ct[body] = 30.0
    for organ, hu in ((parotid_l, 10.0), (parotid_r, 10.0), (larynx, -40.0), (brainstem, 35.0)):
        ct[organ & body] = hu
    ct[(esophagus & body)] = -200.0  # partly air-filled lumen
    ct[(vertebra | mandible) & body] = 900.0
    ct[body] += rng.normal(0.0, 15.0, size=int(body.sum())).astype(np.float32)

    structures = {
        "External": body,
        "Brainstem": brainstem & body,
        "SpinalCord": spinal_cord & body,
        "Parotid_R": parotid_r & body,
        "Parotid_L": parotid_l & body,
        "Larynx": larynx & body,
        "Esophagus": esophagus & body,
        "Mandible": mandible & body,
        "PTV_70": ptv70,
        "PTV_63": ptv63,
        "PTV_56": ptv56,
    }
    geometry = ImageGeometry(
        shape=shape,
        spacing=spacing_xyz,
        origin=tuple(-(n - 1) / 2 * s for n, s in zip((nx, ny, nz), spacing_xyz)),
    )
    case = PlanningCase(
        geometry=geometry,
        ct=ct,
        structures=structures,
        prescriptions=dict(SAMPLE_PRESCRIPTIONS),
        possible_dose_mask=body,
        patient_id=f"DoseAISample{seed}",
    )
    if with_dose:
        case.dose = sample_dose(case)
    return case


def sample_dose(case: PlanningCase, falloff_mm: float = 12.0, low_dose_gy: float = 8.0) -> np.ndarray:
    """A smooth plan-like dose: each target's prescription inside it, exponential fall-off outside,
    a low dose bath in the body; the highest target-derived value wins. Synthetic, for demos and tests."""
    spacing_zyx = case.geometry.spacing[::-1]
    dose = np.zeros(case.geometry.shape, dtype=np.float32)
    for name, gy in case.prescriptions.items():
        mask = case.mask(name)
        if not mask.any():
            continue
        distance = ndimage.distance_transform_edt(~mask, sampling=spacing_zyx)
        dose = np.maximum(dose, (gy * np.exp(-distance / falloff_mm)).astype(np.float32))
    body = case.structures.get("External", np.ones(case.geometry.shape, bool))
    dose = ndimage.gaussian_filter(np.where(body, np.maximum(dose, low_dose_gy), 0.0), sigma=1.0)
    for name in sorted(case.prescriptions, key=case.prescriptions.get):  # targets covered, highest wins
        inside = case.mask(name)
        dose[inside] = np.maximum(dose[inside], case.prescriptions[name])
    return (dose * body).astype(np.float32)
