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
import math
import time
import warnings
from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp
import torch

from doseai.case import PlanningCase
from doseai.engine.beams import bixel_layout
from doseai.engine.influence import BeamSet, DoseInfluence, torch_csr_from_scipy
from doseai.engine.working_grid import body_mask, to_working_grid

#: Nominal energy of every PyDoseRT machine preset.
PYDOSERT_ENERGY_MV = 10.0
#: A typical TPR20,10 of a 6 MV beam, for a "6 MV-like" kernel on a 10 MV preset (see PyDoseRTEngine).
TPR_20_10_6MV = 0.67


@contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
        yield


def _pad_to_cylinder(ct: np.ndarray, resolution, iso: tuple[float, float, float]):
    """PyDoseRT rotates each axial slice about the isocentre and loses what leaves the grid. Pad the
    (D, W) = (y, x) plane with air so the isocentre is central and the circle through the farthest
    non-air voxel fits. Returns (padded CT, isocentre on it, slices that crop back)."""
    _, res_d, res_w = resolution
    tissue = (ct > -500).any(axis=0)
    d, w = np.nonzero(tissue) if tissue.any() else (np.zeros(1), np.zeros(1))
    radius = float(np.hypot(d * res_d - iso[1], w * res_w - iso[2]).max()) + max(res_d, res_w)
    pads = []
    for n, res, centre in ((ct.shape[1], res_d, iso[1]), (ct.shape[2], res_w, iso[2])):
        half = max(radius, centre, (n - 1) * res - centre)  # mm the padded axis must reach on each side
        before = int(math.ceil((half - centre) / res - 1e-6))
        after = int(math.ceil((half - ((n - 1) * res - centre)) / res - 1e-6))
        pads.append((before, after))
    padded = np.pad(ct, [(0, 0), *pads], constant_values=-1000.0)
    new_iso = (iso[0], iso[1] + pads[0][0] * res_d, iso[2] + pads[1][0] * res_w)
    crop = (slice(None), slice(pads[0][0], pads[0][0] + ct.shape[1]), slice(pads[1][0], pads[1][0] + ct.shape[2]))
    return padded, new_iso, crop


class PyDoseRTEngine:
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

    name = "pydosert-pencil"

    def __init__(self, preset: str = "varian_10MV", tpr_20_10: float | None = None,
                 working_spacing_mm: float = 5.0, kernel_radius_mm: float = 100.0,
                 per_pencil_depth: bool = True, head_model: bool = True, device: str = "cpu",
                 pencil_fluence_fraction: float = 1e-4, crop_to_body: bool = True):
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
        from pydosert import MachineConfig

        config = MachineConfig(preset=self.preset)
        if self.tpr_20_10 is not None:
            config = config.model_copy(update={"tpr_20_10": float(self.tpr_20_10)})
        return config

    def card(self) -> dict:
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
        return to_working_grid(case, self.working_spacing_mm, self.crop_to_body)

    def prepare(self, case: PlanningCase, beams: BeamSet, bixel_beam: np.ndarray | None = None,
                bixel_position_mm: np.ndarray | None = None) -> "PyDoseRTModel":
        """Working grid, density, padded PyDoseRT geometry and the bixel -> fluence map for ``beams``.
        Without a bixel layout, :func:`doseai.engine.beams.bixel_layout` picks the bixels."""
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

    def uniform_dose(self, case: PlanningCase, beams: BeamSet, bixel_beam=None, bixel_position_mm=None,
                     beam: int | None = None) -> np.ndarray:
        """Dose on the working grid for unit weight on every bixel (of one ``beam`` if given)."""
        model = self.prepare(case, beams, bixel_beam, bixel_position_mm)
        weights = torch.ones(model.n_bixels)
        with torch.no_grad():
            dose = model.forward(weights) if beam is None else model.beam_dose(beam, weights)
        return dose.cpu().numpy()

    def compute(self, case: PlanningCase, beams: BeamSet, progress: bool = True, bixel_beam=None,
                bixel_position_mm=None, relative_threshold: float = 1e-3, batch: int = 8) -> DoseInfluence:
        """Influence matrix by one forward pass per bixel (``batch`` at a time). Entries below
        ``relative_threshold`` x the bixel's maximum are dropped to keep the matrix sparse."""
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


class PyDoseRTModel:
    """PyDoseRT set up for one case and beam set: ``forward(weights)`` -> dose on the working grid."""

    def __init__(self, owner: PyDoseRTEngine, work: PlanningCase, beams: BeamSet, bixel_beam: np.ndarray,
                 bixel_position_mm: np.ndarray):
        from pydosert.physics.attenuation.hu_density_conversion import convert_HU_to_density

        if not np.allclose(work.geometry.direction_matrix, np.eye(3), atol=1e-6):
            raise ValueError("PyDoseRT needs an axis-aligned working grid")
        self.owner, self.working_case, self.beams = owner, work, beams
        self.geometry = work.geometry
        self.bixel_beam, self.bixel_position_mm = bixel_beam, bixel_position_mm
        self.n_bixels = len(bixel_beam)
        self.device = owner.device
        self.config = owner.machine_config()
        # PyDoseRT (H, D, W) = our (z, y, x); its isocentre is in mm from the centre of voxel 0
        self.resolution = tuple(float(s) for s in work.geometry.spacing[::-1])
        iso = np.asarray(beams.isocenter_lps_mm) - np.asarray(work.geometry.origin)
        iso = tuple(float(v) for v in iso[::-1])
        padded, self.iso, self.crop = _pad_to_cylinder(work.ct, self.resolution, iso)
        self.grid_shape = tuple(int(n) for n in padded.shape)
        self.density = convert_HU_to_density(torch.as_tensor(padded, dtype=torch.float32)).to(self.device)
        body = body_mask(work)
        self.body = None if body is None else torch.as_tensor(body, device=self.device)
        self.kernel_size = 2 * int(math.ceil(owner.kernel_radius_mm / min(self.resolution[0], self.resolution[2]))) + 1
        self._fluence_operator()
        self._engines: dict[tuple[int, ...], object] = {}

    def _fluence_operator(self) -> None:
        """Sparse (beams x rows x cols of 1 mm pixels) x bixels matrix: each bixel a square of unit fluence."""
        width = self.beams.bixel_width_mm
        reach = np.abs(self.bixel_position_mm).max(initial=0.0) + width / 2
        sigmas = self.config.head_scatter_sigma or [0.0]
        margin = (5 * 10 * max(sigmas) if self.owner.head_model else 0.0) + 10.0  # sigma in cm, 5 sigma
        size = 2 * int(math.ceil(reach + margin))
        centres = np.arange(size) + 0.5 - size / 2  # pixel centres in mm, rows: BEV y (+z), cols: BEV x
        rows, cols = [], []
        for b, (x, y) in enumerate(self.bixel_position_mm):
            r = np.flatnonzero((centres >= y - width / 2) & (centres < y + width / 2))
            c = np.flatnonzero((centres >= x - width / 2) & (centres < x + width / 2))
            pixels = (self.bixel_beam[b] * size + r[:, None]) * size + c[None, :]
            rows.append(pixels.ravel())
            cols.append(np.full(pixels.size, b))
        n_beams = len(self.beams.gantry_angles_deg)
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        shape = (n_beams * size * size, self.n_bixels)
        operator = sp.csc_array((np.ones(len(rows), np.float32), (rows, cols)), shape=shape)
        self.map_size = size
        self.fluence = torch_csr_from_scipy(operator).to(self.device)

    def _engine(self, beam_ids: tuple[int, ...]):
        if beam_ids not in self._engines:
            from pydosert import BeamSequence, DoseEngine, PencilDepthEngine

            angles = [float(self.beams.gantry_angles_deg[b]) for b in beam_ids]
            template = BeamSequence.create(angles, self.config.number_of_leaf_pairs, field_size=(self.map_size,) * 2,
                                           iso_center=self.iso, device=self.device, requires_grad=False)
            kind = PencilDepthEngine if self.owner.per_pencil_depth else DoseEngine
            extra = {} if self.owner.per_pencil_depth else {"conv_backend": "fft"}
            engine = kind(machine_config=self.config, kernel_size=self.kernel_size,
                          dose_grid_spacing=self.resolution, dose_grid_shape=self.grid_shape,
                          beam_template=template, device=self.device, **extra)
            if self.owner.per_pencil_depth:  # see PyDoseRTEngine: keeps the dose linear in the fluence
                engine.PENCIL_FLUENCE_FRACTION = self.owner.pencil_fluence_fraction
            self._engines[beam_ids] = engine
        return self._engines[beam_ids]

    def _head(self, engine, maps: torch.Tensor) -> torch.Tensor:
        """PyDoseRT's FluenceMapLayer steps that are linear in the fluence (penumbra, profile, head
        scatter), on maps [N, 1, size, size]."""
        if not self.owner.head_model:
            return maps
        from pydosert.physics.fluence.fluence_modeling import (apply_directional_precomputed_kernel,
                                                               apply_head_scatter_kernels)

        layer = engine.fluence_map_layer
        primary = maps
        if getattr(layer, "use_penumbra", False):
            primary = apply_directional_precomputed_kernel(maps, layer.source_penumbra_kernel_mlc,
                                                           layer.source_penumbra_kernel_jaw, padding_mode="replicate")
        if getattr(layer, "use_profile_correction", False):
            primary = primary * layer.profile_correction_map
        if getattr(layer, "use_head_scatter", False):
            scatter = apply_head_scatter_kernels(maps, layer.head_scatter_kernel_mlc, layer.head_scatter_kernel_jaw)
            w = layer.head_scatter_amplitude_mlc
            primary = (1.0 - w) * primary + w * scatter
        return primary

    def _run(self, beam_ids: tuple[int, ...], maps: torch.Tensor) -> torch.Tensor:
        """Dose on the working grid [N, z, y, x] for fluence maps [N, G, size, size] of ``beam_ids``."""
        engine = self._engine(beam_ids)
        n, g = maps.shape[:2]
        maps = self._head(engine, maps.reshape(n * g, 1, self.map_size, self.map_size)).reshape(maps.shape)
        density = self.density.unsqueeze(0).expand(n, *self.grid_shape)
        with _quiet():
            dose = engine(None, None, None, density, fluence_maps=maps.to(engine.dtype))
        dose = dose[(slice(None), *self.crop)].float()
        return dose if self.body is None else dose * self.body

    def _maps(self, weights: torch.Tensor) -> torch.Tensor:
        """Fluence maps [n_beams, size, size] for bixel weights."""
        w = torch.as_tensor(weights, dtype=torch.float32, device=self.device).reshape(-1, 1)
        return (self.fluence @ w).reshape(-1, self.map_size, self.map_size)

    def forward(self, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Dose (z, y, x) on the working grid, all beams; differentiable in ``weights``."""
        beam_ids = tuple(range(len(self.beams.gantry_angles_deg)))
        return self._run(beam_ids, self._maps(weights).unsqueeze(0))[0]

    __call__ = forward

    def beam_dose(self, beam: int, weights: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Dose of one beam (the weights of the other beams are ignored)."""
        return self._run((beam,), self._maps(weights)[beam][None, None])[0]

    def bixel_doses(self, beam: int, bixels: np.ndarray) -> torch.Tensor:
        """Dose [len(bixels), z, y, x] of each bixel of ``beam`` at unit weight."""
        unit = torch.zeros((self.n_bixels, len(bixels)), device=self.device)
        unit[torch.as_tensor(bixels), torch.arange(len(bixels))] = 1.0
        maps = (self.fluence @ unit).reshape(-1, self.map_size, self.map_size, len(bixels))[beam]
        return self._run((beam,), maps.permute(2, 0, 1).unsqueeze(1))
