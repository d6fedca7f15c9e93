"""The contract between dose engines and the fluence optimizer.

An engine turns a planning case and a beam set into a :class:`DoseInfluence`: a sparse dose-influence
matrix (voxels x bixels, Gy per unit bixel weight) on a working grid, plus where each bixel sits in its
beam, so that weights can be shown as fluence maps. The optimizer only ever sees this object, so an
engine can be replaced without touching the optimizer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from doseai.geometry import ImageGeometry


@dataclass(frozen=True)
class BeamSet:
    """Coplanar or non-coplanar photon beams sharing one isocenter (LPS, mm)."""

    gantry_angles_deg: tuple[float, ...]
    isocenter_lps_mm: tuple[float, float, float]
    couch_angles_deg: tuple[float, ...] | None = None  # None: all 0
    energy_mv: float = 6.0
    bixel_width_mm: float = 5.0

    def __post_init__(self) -> None:
        if not self.gantry_angles_deg:
            raise ValueError("a beam set needs at least one beam")
        if self.couch_angles_deg is not None and len(self.couch_angles_deg) != len(self.gantry_angles_deg):
            raise ValueError("give one couch angle per gantry angle")

    @property
    def couches(self) -> tuple[float, ...]:
        """One couch angle per beam (0 where none were given)."""
        return self.couch_angles_deg or tuple(0.0 for _ in self.gantry_angles_deg)


@dataclass
class DoseInfluence:
    """``matrix`` is a torch sparse CSR tensor (n_voxels, n_bixels); rows follow ``geometry.shape`` in C
    order (z, y, x). ``bixel_beam[b]`` is bixel b's beam index and ``bixel_position_mm[b]`` its (x, y)
    centre in that beam's eye view at the isocenter plane."""

    matrix: torch.Tensor
    geometry: ImageGeometry
    beams: BeamSet
    bixel_beam: np.ndarray
    bixel_position_mm: np.ndarray
    engine: str
    timings_s: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_voxels, n_bixels = self.matrix.shape
        if n_voxels != int(np.prod(self.geometry.shape)):
            raise ValueError(f"influence matrix has {n_voxels} rows, the grid {self.geometry.shape} has "
                             f"{int(np.prod(self.geometry.shape))} voxels")
        if len(self.bixel_beam) != n_bixels or len(self.bixel_position_mm) != n_bixels:
            raise ValueError("bixel_beam and bixel_position_mm need one entry per matrix column")

    @property
    def n_bixels(self) -> int:
        """The number of bixels (matrix columns)."""
        return int(self.matrix.shape[1])

    def to(self, device: str | torch.device) -> "DoseInfluence":
        """The same influence with its matrix on ``device``."""
        return DoseInfluence(self.matrix.to(device), self.geometry, self.beams, self.bixel_beam,
                             self.bixel_position_mm, self.engine, dict(self.timings_s))

    def dose(self, weights: torch.Tensor) -> torch.Tensor:
        """Flat dose (n_voxels,) for bixel weights (n_bixels,); differentiable in ``weights``."""
        return (self.matrix @ weights.reshape(-1, 1).to(self.matrix.dtype)).reshape(-1)

    def dose_image(self, weights: torch.Tensor | np.ndarray) -> np.ndarray:
        """Dose on the working grid as a float32 (z, y, x) array."""
        w = torch.as_tensor(np.asarray(weights, dtype=np.float32) if isinstance(weights, np.ndarray) else weights)
        with torch.no_grad():
            flat = self.dose(w.to(self.matrix.device))
        return flat.float().cpu().numpy().reshape(self.geometry.shape)

    def jaws_mm(self, weights: torch.Tensor | np.ndarray) -> list[tuple[float, float, float, float]]:
        """Per beam, the jaws (X1, X2, Y1, Y2 in mm at the isocentre plane, beam's-eye-view axes) around its
        bixels with weight (all its bixels when none has)."""
        w = np.asarray(weights.detach().cpu() if isinstance(weights, torch.Tensor) else weights, dtype=np.float32)
        half = self.beams.bixel_width_mm / 2
        jaws = []
        for beam in range(len(self.beams.gantry_angles_deg)):
            own = self.bixel_beam == beam
            lit = own & (w > 0)
            xy = self.bixel_position_mm[lit if lit.any() else own]
            if len(xy) == 0:
                jaws.append((0.0, 0.0, 0.0, 0.0))
                continue
            low, high = xy.min(axis=0) - half, xy.max(axis=0) + half
            jaws.append((float(low[0]), float(high[0]), float(low[1]), float(high[1])))
        return jaws

    def fluence_maps(self, weights: torch.Tensor | np.ndarray) -> list[np.ndarray]:
        """One 2D map per beam (rows: beam's-eye-view y, columns: x), 0 outside the bixels that exist."""
        w = np.asarray(weights.detach().cpu() if isinstance(weights, torch.Tensor) else weights, dtype=np.float32)
        maps = []
        width = self.beams.bixel_width_mm
        for beam in range(len(self.beams.gantry_angles_deg)):
            own = self.bixel_beam == beam
            if not own.any():
                maps.append(np.zeros((1, 1), np.float32))
                continue
            cols = np.rint(self.bixel_position_mm[own] / width).astype(int)
            cols -= cols.min(axis=0)
            grid = np.zeros((cols[:, 1].max() + 1, cols[:, 0].max() + 1), np.float32)
            grid[cols[:, 1], cols[:, 0]] = w[own]
            maps.append(grid)
        return maps


def torch_csr_from_scipy(matrix) -> torch.Tensor:
    """A scipy sparse matrix as a float32 torch CSR tensor, through scipy's CSR (never dense). scipy
    picks 32-bit indices when they fit; torch multiplies (and back-propagates) with either."""
    csr = matrix.tocsr()
    if not csr.has_canonical_format:
        csr.sum_duplicates()
    data = csr.data if csr.data.dtype == np.float32 else csr.data.astype(np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(csr.indptr), torch.from_numpy(csr.indices),
                                       torch.from_numpy(data), size=csr.shape, dtype=torch.float32,
                                       check_invariants=False)
