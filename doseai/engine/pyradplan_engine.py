"""Dose-influence matrices with pyRadPlan's photon SVD pencil beam (the matRad algorithm, in Python).

The case is resampled to the working grid, handed to pyRadPlan as its CT (the dose grid *is* that CT
grid, so pyRadPlan resamples nothing), and pyRadPlan's sparse CSC matrix is turned into a torch CSR
matrix. pyRadPlan indexes dose-grid voxels by ``np.flatnonzero`` of the SimpleITK array, i.e. C order
over (z, y, x) -- our order -- which Testing/test_engine.py checks against ``calc_dose_forward``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from doseai.engine.contract import DoseEngine, DoseEngineError, EngineRequirements
from doseai.engine.working_grid import body_mask, to_working_grid
from doseai.errors import GeometryMismatchError
from doseai.packages import PLAN_PACKAGES, PYRADPLAN_REQUIREMENT

if TYPE_CHECKING:  # torch loads with DoseInfluence: not before an engine computes
    from doseai.case import PlanningCase
    from doseai.engine.influence import BeamSet, DoseInfluence

logger = logging.getLogger(__name__)


def _short_array_text():
    """pyRadPlan's pydantic models turn every ray's arrays into text while they validate them (about 14 reprs
    per ray, none of it ever shown; about a fifth of the matrix's time: Testing/benchmarks/bench_engine_time.py): a fixed short text
    instead while pyRadPlan runs (numpy's ``override_repr``, numpy >= 2.1; older numpy: as it is)."""
    if "override_repr" not in inspect.signature(np.set_printoptions).parameters:
        return contextlib.nullcontext()
    return np.printoptions(override_repr=lambda array: f"<array {array.shape}>")


@contextmanager
def _quiet():
    """pyRadPlan warns that no GPU is there and numpy warns on its ray-tracer's 1/0 for axis-parallel
    rays (it relies on the resulting inf); neither is news to our users."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"), _short_array_text():
        warnings.filterwarnings("ignore", message="Requested GPU device is not available")
        yield


@contextmanager
def _library_errors() -> Iterator[None]:
    """pyRadPlan 0.5 raises a bare ValueError when the rays of some bixels miss the patient: say what to do."""
    try:
        yield
    except ValueError as error:
        raise DoseEngineError(
            f"pyRadPlan's dose engine failed ({error}). This happens when beam rays miss the patient, e.g. "
            "when a target reaches the first or last CT slice: use a CT that extends beyond the targets "
            "(a few centimetres), or other bixel widths or beam numbers") from error


class PyRadPlanEngine(DoseEngine):
    """pyRadPlan's ``PhotonPencilBeamSVDEngine`` on the working grid.

    ``working_spacing_mm``: voxel size of the working grid (None: the case grid as it is, which must then
    be axis-aligned). ``lateral_cutoff_mm``: pyRadPlan's geometric lateral cut-off around each bixel's ray.
    ``crop_to_body``: the working grid covers the body plus 10 mm only.
    """

    key = "pyradplan"
    name = "pyradplan-svdpb"
    label = "pyRadPlan"
    description = "pyRadPlan's photon pencil beam with SVD kernels (matRad's algorithm), generic 6 MV machine"
    # pyRadPlan goes in with --no-deps (doseai.packages.NO_DEPS_REQUIREMENTS), beside what its dose engine imports
    requirements = EngineRequirements(
        library="pyRadPlan", packages={**PLAN_PACKAGES, "pyRadPlan": PYRADPLAN_REQUIREMENT},
        install_hint=f"pip install -e '.[plan]' && pip install --no-deps {PYRADPLAN_REQUIREMENT}")

    def __init__(self, working_spacing_mm: float | None = 5.0, machine: str = "Generic",
                 lateral_cutoff_mm: float = 50.0, crop_to_body: bool = True):
        self.working_spacing_mm = working_spacing_mm
        self.crop_to_body = crop_to_body
        self.machine = machine
        self.lateral_cutoff_mm = float(lateral_cutoff_mm)

    def card(self) -> dict:
        """What this engine models and what it does not (as read in pyRadPlan 0.5.0's source)."""
        import pyRadPlan

        return {
            "name": self.name,
            "library": f"pyRadPlan {getattr(pyRadPlan, '__version__', '?')} (numpy backend)",
            "algorithm": "photon pencil beam with singular-value-decomposed kernels (Bortfeld, Schlegel & "
                         "Rhein 1993), matRad's SVDPB engine ported to Python",
            "machine": f"pyRadPlan bundled 'photons_{self.machine}' machine: generic 6 MV (its only energy), "
                       "SAD 1000 mm, 3 kernel components tabulated to 179.5 mm radius for a range of SSDs",
            "energy_mv": 6.0,
            "models": [
                "depth dose from the SVD kernel components, evaluated at the radiological depth",
                "heterogeneity: radiological depth by Siddon ray tracing along divergent rays from the "
                "source through a density cube (pyRadPlan's default HU -> relative density table)",
                "lateral spread: kernel components convolved with a square bixel fluence and a Gaussian "
                "source penumbra (5 mm FWHM at the isocentre), evaluated at the lateral distance projected "
                "to the isocentre plane",
                "inverse square law (SAD / distance from the source)^2",
                "kernel chosen per beam at the SSD of the ray nearest the beam axis",
            ],
            "not_modelled": [
                "Monte Carlo transport; no lateral density scaling of the kernel (no electron "
                "disequilibrium at tissue/air or tissue/lung interfaces)",
                "MLC leaves and jaws: no leaf geometry, transmission, tongue-and-groove or leaf-end effects "
                "(bixels are ideal squares)",
                "head scatter and field-size-dependent output factors beyond what the kernels contain",
                "primary fluence horns (the machine's primary-fluence table is not applied by default)",
                "dose beyond the geometric lateral cut-off around each bixel's ray",
                "dose outside the body (External / possible-dose mask) -- set to 0 there; densities "
                "outside the body are ignored",
            ],
            "lateral_cutoff_mm": self.lateral_cutoff_mm,
            "dose_units": "pyRadPlan's dose per unit bixel weight (its MU calibration not checked here)",
            "working_spacing_mm": self.working_spacing_mm,
        }

    # --- conversion to pyRadPlan ----------------------------------------------------------------
    def working_case(self, case: PlanningCase) -> PlanningCase:
        """The case on the working grid (resampled and cropped to the body, or as it is without a spacing)."""
        if self.working_spacing_mm is None:
            if not np.allclose(case.geometry.direction_matrix, np.eye(3), atol=1e-6):
                raise GeometryMismatchError(
                    "the pyRadPlan engine needs an axis-aligned grid: give a working_spacing_mm to resample")
            return case if case.ct is not None else to_working_grid(case, case.geometry.spacing)
        return to_working_grid(case, self.working_spacing_mm, self.crop_to_body)

    def pyradplan_inputs(self, work: PlanningCase, beams: BeamSet):
        """pyRadPlan (CT, StructureSet, PhotonPlan) for a working-grid case: targets as TARGET, other
        structures as OAR, the body as EXTERNAL (the whole grid when no body is known: pyRadPlan only
        computes dose in voxels that belong to some structure)."""
        from pyRadPlan import PhotonPlan, validate_ct
        from pyRadPlan.cst import StructureSet, validate_voi

        work.require_target()
        ct = validate_ct(cube_hu=work.geometry.to_sitk(work.ct.astype(np.float32)))
        grid = ct.grid
        vois = []
        for name, mask in work.structures.items():
            if name == "External" or not mask.any():
                continue
            kind = "TARGET" if name in work.prescriptions else "OAR"
            vois.append(validate_voi(name=name, voi_type=kind, mask=mask.astype(np.uint8), grid=grid))
        body = body_mask(work)
        body = np.ones(work.geometry.shape, bool) if body is None else body
        vois.append(validate_voi(name="External", voi_type="EXTERNAL", mask=body.astype(np.uint8), grid=grid))
        cst = StructureSet(vois=vois, ct_image=ct)
        pln = PhotonPlan(
            machine=self.machine,
            prop_stf={"gantry_angles": [float(a) for a in beams.gantry_angles_deg],
                      "couch_angles": [float(a) for a in beams.couches],
                      "bixel_width": float(beams.bixel_width_mm),
                      "iso_center": [float(v) for v in beams.isocenter_lps_mm],
                      "energy": float(beams.energy_mv)},
            prop_dose_calc={"engine": "SVDPB", "dose_grid": grid,
                            "geometric_lateral_cutoff": self.lateral_cutoff_mm},
        )
        return ct, cst, pln

    def generate_stf(self, ct, cst, pln, progress: bool = False):
        """pyRadPlan's steering information (beams, rays, bixels) for its inputs."""
        from pyRadPlan import validate_stf
        from pyRadPlan.stf.generators import get_generator

        generator = get_generator(pln)
        generator.console_progress = progress
        with _quiet():
            return validate_stf(generator.generate(ct, cst))

    def dose_engine(self, pln, progress: bool = False):
        """pyRadPlan's dose engine for the plan (its SVD pencil beam)."""
        from pyRadPlan.dose.engines import get_engine

        with _quiet():
            engine = get_engine(pln)
        engine.console_progress = progress
        return engine

    # --- the engine -----------------------------------------------------------------------------
    def compute(self, case: PlanningCase, beams: BeamSet, progress: bool = True) -> DoseInfluence:
        """Dose-influence matrix (working-grid voxels x bixels) for ``beams`` on ``case``.

        (Sharing the beams out to two processes was tried: on 2 cores it was slower, 110 s against 78-97 s
        for an OpenKBP case, so pyRadPlan runs in this process.)"""
        from doseai.engine.influence import DoseInfluence, torch_csr_from_scipy

        timings = {}
        start = time.perf_counter()
        import pyRadPlan  # noqa: F401 - a few seconds on first use, kept out of the other timings

        timings["import_s"] = time.perf_counter() - start
        start = time.perf_counter()
        work = self.working_case(case)
        with _library_errors():
            ct, cst, pln = self.pyradplan_inputs(work, beams)
        timings["prepare_s"] = time.perf_counter() - start

        start = time.perf_counter()
        with _library_errors():
            stf = self.generate_stf(ct, cst, pln, progress)
        timings["stf_s"] = time.perf_counter() - start
        energies = {float(beamlet.energy) for beam in stf.beams for ray in beam.rays for beamlet in ray.beamlets}
        used = energies.pop() if len(energies) == 1 else float(beams.energy_mv)
        if abs(used - beams.energy_mv) > 1e-6:
            logger.warning("pyRadPlan's '%s' machine has no %g MV; it computed %g MV", self.machine,
                           beams.energy_mv, used)
            beams = dataclasses.replace(beams, energy_mv=used)

        start = time.perf_counter()
        with _library_errors():
            engine = self.dose_engine(pln, progress)
            with _quiet():
                dij = engine.calc_dose_influence(ct, cst, stf)
        timings["dij_s"] = time.perf_counter() - start

        start = time.perf_counter()
        scipy_matrix = dij.physical_dose.flat[0]
        n_voxels = int(np.prod(work.geometry.shape))
        if scipy_matrix.shape[0] != n_voxels:
            raise GeometryMismatchError(f"pyRadPlan returned {scipy_matrix.shape[0]} dose voxels for a grid of "
                                        f"{n_voxels}: its dose grid is not the working grid")
        bixel_beam = np.asarray(dij.beam_num, dtype=np.int64).reshape(-1)
        ray_num = np.asarray(dij.ray_num, dtype=np.int64).reshape(-1)
        positions = np.array([stf.beams[b].rays[r].ray_pos_bev for b, r in zip(bixel_beam, ray_num)],
                             dtype=np.float64).reshape(-1, 3)[:, [0, 2]]  # BEV (x, z) -> our BEV (x, y)
        matrix = torch_csr_from_scipy(scipy_matrix)
        del dij, scipy_matrix
        timings["convert_s"] = time.perf_counter() - start
        return DoseInfluence(matrix=matrix, geometry=work.geometry, beams=beams, bixel_beam=bixel_beam,
                             bixel_position_mm=positions, engine=self.name, timings_s=timings)
