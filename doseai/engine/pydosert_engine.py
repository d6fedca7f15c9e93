"""A second photon engine on PyDoseRT (differentiable torch pencil-beam convolution), for comparison.

PyDoseRT ships 10 MV machine presets only. Bixel weights become 1 mm fluence maps at the isocentre
plane (each bixel a square of its width); PyDoseRT's linear fluence steps (source penumbra, off-axis
profile correction, head-scatter blend) are applied to them as its ``FluenceMapLayer`` would for an
MLC aperture, and its engine turns the maps into dose. The dose is linear in the weights, so
``compute`` can build a :class:`DoseInfluence` from one forward pass per bixel -- exact but costly
(a full-volume pass per bixel); :meth:`PyDoseRTModel.forward` is the cheap path.

Axes: PyDoseRT's (H, D, W) volume is our (z, y, x) working grid (identity direction): its gantry-0
beam runs along +D = +y (posterior) and its gantry-90 beam along -W = -x, as in IEC/LPS; a fluence map
row is +z and a column is the BEV x axis (checked against pyRadPlan in Testing/test_engine.py).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import numpy as np

from doseai.engine.contract import DoseEngine, EngineRequirements
from doseai.engine.working_grid import to_working_grid
from doseai.packages import PLAN_PACKAGES, PYDOSERT_REQUIREMENT

if TYPE_CHECKING:  # torch, scipy and PyDoseRT load when the engine is built or prepares a case
    import torch

    from doseai.case import PlanningCase
    from doseai.engine.influence import BeamSet, DoseInfluence
    from doseai.engine.pydosert_model import PyDoseRTModel

#: Nominal energy of every PyDoseRT machine preset.
PYDOSERT_ENERGY_MV = 10.0
#: A typical TPR20,10 of a 6 MV beam, for a "6 MV-like" kernel on a 10 MV preset (see PyDoseRTEngine).
TPR_20_10_6MV = 0.67


class PyDoseRTEngine(DoseEngine):
    """PyDoseRT on the working grid.

    ``preset``: a PyDoseRT machine preset (``varian_10MV``, ``elekta_10MV``: all 10 MV).
    ``tpr_20_10``: overrides the preset's beam quality, which is the only input of PyDoseRT's kernel
    (e.g. :data:`TPR_20_10_6MV` for a 6 MV-like kernel); the rest of the preset (head scatter, profile,
    penumbra) stays 10 MV. ``per_pencil_depth``: ``PencilDepthEngine`` (radiological depth per BEV
    pencil) instead of ``DoseEngine`` (one depth per plane, from the central axis).
    ``kernel_radius_mm``: lateral extent of the convolution kernel. ``pencil_fluence_fraction``: pencils
    with less fluence than this fraction of the beam's maximum keep the central-axis depth. PyDoseRT's
    default (5%) makes the dose depend non-linearly on the weights (a bixel's treatment changes with its
    neighbours' weights: 1.2% of the maximum dose on an oblique beam in Testing/test_engine.py's box);
    at 1e-4 an influence matrix and the forward pass agree to ~1e-5, at some cost in speed.
    """

    key = "pydosert"
    name = "pydosert-pencil"
    label = "PyDoseRT"
    description = "PyDoseRT's differentiable pencil-beam convolution (torch), 10 MV presets; for comparison"
    # PyDoseRT goes in with --no-deps (doseai.packages.NO_DEPS_REQUIREMENTS), beside what it imports
    requirements = EngineRequirements(
        library="pydosert",
        packages={"scipy": PLAN_PACKAGES["scipy"], "pydantic": "pydantic>=2.11",
                  "pydantic_settings": "pydantic-settings>=2.11", "tqdm": "tqdm>=4.60",
                  "pydosert": PYDOSERT_REQUIREMENT},
        install_hint=f"pip install scipy 'pydantic>=2.11' 'pydantic-settings>=2.11' tqdm && "
                     f"pip install --no-deps {PYDOSERT_REQUIREMENT}")

    def __init__(self, preset: str = "varian_10MV", tpr_20_10: float | None = None,
                 working_spacing_mm: float = 5.0, kernel_radius_mm: float = 100.0,
                 per_pencil_depth: bool = True, head_model: bool = True, device: str = "cpu",
                 pencil_fluence_fraction: float = 1e-4, crop_to_body: bool = True):
        import torch

        self.crop_to_body = crop_to_body
        self.preset = preset
        self.tpr_20_10 = tpr_20_10
        self.working_spacing_mm = working_spacing_mm
        self.kernel_radius_mm = float(kernel_radius_mm)
        self.per_pencil_depth = per_pencil_depth
        self.head_model = head_model
        self.device = torch.device(device)
        self.pencil_fluence_fraction = float(pencil_fluence_fraction)
        self.model: PyDoseRTModel | None = None

    def machine_config(self):
        """PyDoseRT's ``MachineConfig`` of :attr:`preset`, with :attr:`tpr_20_10` when given."""
        from pydosert import MachineConfig

        config = MachineConfig(preset=self.preset)
        if self.tpr_20_10 is not None:
            config = config.model_copy(update={"tpr_20_10": float(self.tpr_20_10)})
        return config

    def card(self) -> dict:
        """What this engine models and what it does not (as read in PyDoseRT 1.5's source)."""
        import pydosert

        config = self.machine_config()
        return {
            "name": self.name,
            "library": f"pydosert {getattr(pydosert, '__version__', '?')} "
                       f"({'PencilDepthEngine' if self.per_pencil_depth else 'DoseEngine'}), torch on {self.device}",
            "algorithm": "pencil-beam convolution in each beam's frame: fluence maps projected with divergence "
                         "and inverse square, convolved plane by plane with an analytic kernel "
                         "(A exp(-a r) + B exp(-b r)) / r whose depth-dependent parameters are polynomials in "
                         "TPR20,10; the beam-frame dose is rotated back onto the grid",
            "machine": f"PyDoseRT preset '{self.preset}' (all PyDoseRT presets are 10 MV)"
                       + (f", TPR20,10 overridden to {config.tpr_20_10} (kernel only; head scatter, profile and "
                          "penumbra stay those of the 10 MV preset)" if self.tpr_20_10 is not None else ""),
            "energy_mv": PYDOSERT_ENERGY_MV,
            "tpr_20_10": config.tpr_20_10,
            "models": [
                "heterogeneity: radiological depth "
                + ("per beam's-eye-view pencil (parallel to the central axis, no divergence) for pencils with "
                   f"at least {self.pencil_fluence_fraction:g} of the beam's maximum fluence, central-axis depth "
                   "for the rest" if self.per_pencil_depth
                   else "along the central axis only, applied to whole depth planes"),
                "kernel picked by radiological depth; lateral kernel in geometric distance (no density scaling)",
                "divergence and inverse square of the projected fluence",
                ("source penumbra, off-axis profile correction and head-scatter blend of the preset, applied to "
                 "the bixel fluence maps" if self.head_model else "ideal bixel fluence (no head model)"),
                "the grid is padded with air so that no tissue leaves PyDoseRT's rotation cylinder",
            ],
            "not_modelled": [
                "Monte Carlo transport; lateral electron disequilibrium at interfaces",
                "MLC leaves, jaws, leaf transmission, dosimetric leaf gap and field-size output factors "
                "(PyDoseRT applies those only when it builds fluence from leaf positions, which bixel "
                "weights bypass)",
                "electron contamination beyond the kernel (none in the 10 MV presets)",
                "non-coplanar beams and couch angles",
                "absolute calibration: dose per unit weight in PyDoseRT's uncalibrated units",
                "dose outside the body (External / possible-dose mask) -- set to 0 there",
            ],
            "fluence_pixel_mm": 1.0,
            "kernel_radius_mm": self.kernel_radius_mm,
            "working_spacing_mm": self.working_spacing_mm,
        }

    def working_case(self, case: PlanningCase) -> PlanningCase:
        """The case on the working grid (resampled, cropped to the body unless told otherwise)."""
        return to_working_grid(case, self.working_spacing_mm, self.crop_to_body)

    def prepare(self, case: PlanningCase, beams: BeamSet, bixel_beam: np.ndarray | None = None,
                bixel_position_mm: np.ndarray | None = None) -> PyDoseRTModel:
        """Working grid, density, padded PyDoseRT geometry and the bixel -> fluence map for ``beams``.
        Without a bixel layout, :func:`doseai.engine.beams.bixel_layout` picks the bixels."""
        from doseai.engine.beams import bixel_layout
        from doseai.engine.pydosert_model import PyDoseRTModel

        if any(abs(c) > 1e-6 for c in beams.couches):
            raise ValueError("the PyDoseRT engine handles coplanar beams only (couch angle 0)")
        work = self.working_case(case)
        if bixel_beam is None or bixel_position_mm is None:
            bixel_beam, bixel_position_mm = bixel_layout(work, beams)
        self.model = PyDoseRTModel(self, work, beams, np.asarray(bixel_beam, np.int64),
                                   np.asarray(bixel_position_mm, np.float64))
        return self.model

    def forward(self, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Dose (z, y, x) on the working grid of the last :meth:`prepare`; differentiable in ``weights``."""
        if self.model is None:
            raise RuntimeError("call prepare(case, beams) before forward(weights)")
        return self.model.forward(weights)

    def compute(self, case: PlanningCase, beams: BeamSet, progress: bool = True, bixel_beam=None,
                bixel_position_mm=None, relative_threshold: float = 1e-3, batch: int = 8) -> DoseInfluence:
        """Influence matrix by one forward pass per bixel (``batch`` at a time). Entries below
        ``relative_threshold`` x the bixel's maximum are dropped to keep the matrix sparse."""
        import scipy.sparse as sp
        import torch

        from doseai.engine.influence import DoseInfluence, torch_csr_from_scipy

        start = time.perf_counter()
        model = self.prepare(case, beams, bixel_beam, bixel_position_mm)
        prepare_s = time.perf_counter() - start
        start = time.perf_counter()
        rows, cols, vals = [], [], []
        order = range(len(beams.gantry_angles_deg))
        if progress:
            from tqdm import tqdm

            order = tqdm(order, desc="PyDoseRT beams", unit="beam")
        for b in order:
            own = np.flatnonzero(model.bixel_beam == b)
            for first in range(0, len(own), batch):
                chunk = own[first:first + batch]
                with torch.no_grad():
                    doses = model.bixel_doses(b, chunk).reshape(len(chunk), -1).cpu().numpy()
                for column, dose in zip(chunk, doses):
                    keep = np.flatnonzero(dose > relative_threshold * dose.max())
                    rows.append(keep)
                    cols.append(np.full(len(keep), column, np.int64))
                    vals.append(dose[keep])
        n_voxels = int(np.prod(model.geometry.shape))
        entries = (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols)))
        matrix = sp.csc_array(entries, shape=(n_voxels, model.n_bixels))
        dij_s = time.perf_counter() - start
        modelled = dataclasses.replace(beams, energy_mv=PYDOSERT_ENERGY_MV)  # what PyDoseRT's presets are
        return DoseInfluence(matrix=torch_csr_from_scipy(matrix), geometry=model.geometry, beams=modelled,
                             bixel_beam=model.bixel_beam, bixel_position_mm=model.bixel_position_mm,
                             engine=self.name, timings_s={"prepare_s": prepare_s, "dij_s": dij_s})
