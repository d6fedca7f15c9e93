"""PyDoseRT set up for one case and beam set: bixel weights -> 1 mm fluence maps -> dose on the working grid.

What :meth:`doseai.engine.pydosert_engine.PyDoseRTEngine.prepare` builds (see that module for the axes and
what is modelled). It imports torch and PyDoseRT, so it loads only when an engine prepares a case.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
import torch

from doseai.case import PlanningCase
from doseai.engine.influence import BeamSet, torch_csr_from_scipy
from doseai.engine.working_grid import body_mask


class PyDoseRTSettings(Protocol):
    """What a :class:`PyDoseRTModel` reads of the engine that made it (a ``PyDoseRTEngine``)."""

    device: torch.device
    kernel_radius_mm: float
    per_pencil_depth: bool
    head_model: bool
    pencil_fluence_fraction: float

    def machine_config(self) -> Any:
        """PyDoseRT's ``MachineConfig`` of the engine's preset."""


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


class PyDoseRTModel:
    """PyDoseRT set up for one case and beam set: ``forward(weights)`` -> dose on the working grid."""

    def __init__(self, owner: PyDoseRTSettings, work: PlanningCase, beams: BeamSet, bixel_beam: np.ndarray,
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
