"""A fluence problem seen from each beam (issue 29): the bixels of every beam on one beam's-eye-view canvas, and
what the planner knows before optimizing, projected back along each bixel's dose (A^T of the dose-mimicking
objective's pieces). These are the fluence generator's inputs (:mod:`doseai.models.fluence_generator`); its output
is a map of weights on the same canvas.

Per bixel j, with A the influence matrix on the objective's voxels, c_v the voxel's priority, d_v its desired dose,
u the uniform starting weight (mean target dose at the prescription) and s_j = sum_v A_vj the bixel's dose output:

    ratio        (A^T C d)_j / (A^T C A u1)_j          what the desired dose asks of the bixel over the uniform plan
    jacobi       asinh((A^T C (d - A u1))_j / (A^T C A)_jj / u / 50)   the first Jacobi step (damped: it overshoots)
    desired      (A^T d)_j / s_j / Rx                  the desired dose along the bixel's dose, over the prescription
    targets      (A^T sum_t Rx_t/Rx 1_t)_j / s_j       the share of its dose in targets, weighed by their prescriptions
    top target   (A^T 1_top)_j / s_j                   the share in the highest-prescription target
    oars         (A^T 1_oar)_j / s_j                   the share in OARs
    oar desired  (A^T 1_oar d)_j / (A^T 1_oar)_j / Rx  the desired dose in the OARs it reaches
    output       log(s_j / median s)                   depth and path length
    exists       1 where a bixel is, 0 elsewhere on the canvas
    cos, sin     of the beam's gantry angle

All are scale-free, so patients with different prescriptions and matrix scales look alike. scipy's sparse
products do the projections (one product with a few columns)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from doseai.engine.influence import DoseInfluence
from doseai.errors import DoseAIError

FEATURES = ("ratio", "jacobi", "desired", "targets", "top_target", "oars", "oar_desired", "output", "exists",
            "gantry_cos", "gantry_sin")
CANVAS_MULTIPLE = 4  # the generator's UNet halves the canvas twice


@dataclass(frozen=True)
class BeamLayout:
    """Where each bixel sits: beam ``beam[j]``, canvas row ``row[j]`` (beam's-eye-view y), column ``col[j]`` (x);
    all beams share one square ``shape``, a multiple of :data:`CANVAS_MULTIPLE`."""

    beam: np.ndarray
    row: np.ndarray
    col: np.ndarray
    shape: tuple[int, int]
    n_beams: int

    @classmethod
    def of(cls, influence: DoseInfluence) -> "BeamLayout":
        """The layout of ``influence``'s bixels: their common bounding box in the middle of the canvas (engines
        put bixel centres on or half a bixel off the isocenter's ray; either way they lie on one lattice)."""
        position = np.asarray(influence.bixel_position_mm, float)
        index = np.rint((position - position.min(axis=0)) / influence.beams.bixel_width_mm).astype(int)
        extent = index.max(axis=0) + 1
        size = int(-(-extent.max() // CANVAS_MULTIPLE) * CANVAS_MULTIPLE)
        index += (size - extent) // 2
        return cls(np.asarray(influence.bixel_beam, int), index[:, 1], index[:, 0], (size, size),
                   len(influence.beams.gantry_angles_deg))

    def to_maps(self, values: np.ndarray) -> np.ndarray:
        """(n_bixels, C) per-bixel values -> (n_beams, C, rows, columns), 0 where no bixel is."""
        values = np.asarray(values, np.float32).reshape(len(self.beam), -1)
        maps = np.zeros((self.n_beams, values.shape[1], *self.shape), np.float32)
        maps[self.beam, :, self.row, self.col] = values
        return maps

    def from_maps(self, maps: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """(n_beams, C, rows, columns) -> (n_bixels, C): each bixel's values."""
        return maps[self.beam, :, self.row, self.col]


def _projections(influence: DoseInfluence, terms: Sequence, prescriptions: dict[str, float],
                 uniform_weight: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A^T of the per-voxel vectors the features need, and the Gauss-Newton diagonal (A^T C A)_jj."""
    import scipy.sparse

    from doseai.optimize.objectives import DoseMimicking

    if not terms or not all(isinstance(term, DoseMimicking) for term in terms):
        raise DoseAIError("the fluence generator plans toward a desired dose: it needs dose-mimicking objectives "
                          "(mode 'mimic')")
    matrix = influence.matrix.cpu()
    values, columns_of, starts = matrix.values().numpy(), matrix.col_indices().numpy(), matrix.crow_indices().numpy()
    shape = tuple(matrix.shape)
    csr = scipy.sparse.csr_matrix((values, columns_of, starts), shape=shape)
    n = shape[0]  # vectors over all voxels, 0 outside the objective's: no row slicing of the matrix
    priority, desired = np.zeros(n), np.zeros(n)
    top = max(prescriptions.values()) if prescriptions else 1.0
    top_name = max(prescriptions, key=prescriptions.get) if prescriptions else None
    targets, top_target, oars, everywhere = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    for term in terms:
        at = term.voxels.cpu().numpy()
        priority[at] += float(term.priority)
        desired[at] = term.reference_gy.cpu().numpy()
        everywhere[at] = 1.0
        if term.structure in prescriptions:
            targets[at] = np.maximum(targets[at], prescriptions[term.structure] / top)
            if term.structure == top_name:
                top_target[at] = 1.0
        elif term.one_sided:
            oars[at] = 1.0
    uniform_dose = uniform_weight * (csr @ np.ones(shape[1]))
    columns = np.stack([priority * desired, priority * uniform_dose, priority * (desired - uniform_dose), desired,
                        targets, top_target, oars, oars * desired, everywhere], axis=1)
    projected = np.asarray(csr.T @ columns)
    names = ("c_d", "c_uniform", "c_residual", "d", "targets", "top_target", "oars", "oar_d", "output")
    squared = scipy.sparse.csr_matrix((np.square(values, dtype=np.float64), columns_of, starts), shape=shape)
    curvature = np.asarray(squared.T @ priority).ravel()
    return dict(zip(names, projected.T)), curvature


def bixel_features(influence: DoseInfluence, terms: Sequence, prescriptions: dict[str, float],
                   uniform_weight: float) -> np.ndarray:
    """(n_bixels, len(FEATURES)) features of a mimicking problem (see the module docstring)."""
    p, curvature = _projections(influence, terms, prescriptions, uniform_weight)
    top = max(prescriptions.values()) if prescriptions else 1.0
    tiny = 1e-12
    output = np.maximum(p["output"], tiny)
    oar_dose = p["oars"]
    angles = np.deg2rad(np.asarray(influence.beams.gantry_angles_deg, float))[np.asarray(influence.bixel_beam, int)]
    features = np.stack([
        p["c_d"] / np.maximum(p["c_uniform"], tiny),
        np.arcsinh(p["c_residual"] / np.maximum(curvature, tiny) / uniform_weight / 50.0),
        p["d"] / output / top,
        p["targets"] / output,
        p["top_target"] / output,
        oar_dose / output,
        np.where(oar_dose > tiny, p["oar_d"] / np.maximum(oar_dose, tiny), 0.0) / top,
        np.log(output / np.median(output)),
        np.ones_like(output),
        np.cos(angles), np.sin(angles),
    ], axis=1)
    return np.nan_to_num(features.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def weights_to_target(weights: np.ndarray | torch.Tensor, uniform_weight: float):
    """The generator's output space: asinh(w / u) (weights span orders of magnitude; many are 0)."""
    if isinstance(weights, torch.Tensor):
        return torch.asinh(weights / uniform_weight)
    return np.arcsinh(np.asarray(weights, np.float32) / uniform_weight)


def target_to_weights(target: np.ndarray | torch.Tensor, uniform_weight: float):
    """Back from the output space to non-negative weights."""
    if isinstance(target, torch.Tensor):
        return torch.sinh(target).clamp(min=0.0) * uniform_weight
    return np.maximum(np.sinh(np.asarray(target, np.float32)), 0.0) * uniform_weight
