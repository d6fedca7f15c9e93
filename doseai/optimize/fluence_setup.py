"""What the fluence optimizer reads from a dose-influence matrix before it iterates: rows of the matrix
gathered and transposed as CSR blocks (scipy on CPU, torch ops elsewhere, e.g. CUDA), the neighbouring
bixel pairs of the smoothness term, the check that objective voxels lie on the working grid, and the
uniform initial weights.

Float32 values with int32 indices where the size allows: MKL and cuSPARSE's fast path (int64 indices were
6x slower on CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from doseai.engine.influence import DoseInfluence
from doseai.optimize.objectives import ObjectiveTerm

_SCIPY_ON_CPU = True  # gather rows and transpose with scipy on CPU (tests switch it off to run the torch path)


def _csr_parts(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow, col, values) of a sparse matrix, converted to CSR if it is not."""
    if matrix.layout != torch.sparse_csr:
        matrix = matrix.to_sparse_csr()
    return matrix.crow_indices(), matrix.col_indices(), matrix.values()


def _csr(crow, col, values, shape) -> torch.Tensor:
    """A float32 CSR tensor with int32 indices where the size allows (MKL/cuSPARSE's fast path)."""
    index = torch.int32 if max(int(crow[-1]), *shape) < 2**31 - 1 else torch.int64
    return torch.sparse_csr_tensor(crow.to(index), col.to(index), values.to(torch.float32), size=tuple(shape),
                                   check_invariants=False)


def _csr_parts_of(matrix: torch.Tensor, rows: torch.Tensor,
                  use_scipy: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crow, col, values) of the rows ``rows`` (any order) of a CSR matrix, on its device. On CPU scipy
    gathers them (linear time, int32 indices kept); elsewhere torch ops do."""
    crow, col, values = _csr_parts(matrix)
    shape = (int(matrix.shape[0]), int(matrix.shape[1]))
    device = values.device
    if use_scipy if use_scipy is not None else (_SCIPY_ON_CPU and device.type == "cpu"):
        full = sp.csr_matrix((values.detach().numpy().astype(np.float32, copy=False), col.numpy(), crow.numpy()),
                             shape=shape)
        part = full[rows.numpy()]
        return torch.from_numpy(part.indptr), torch.from_numpy(part.indices), torch.from_numpy(part.data)
    crow, col = crow.long(), col.long()
    rows = rows.to(device).long()
    start = crow[rows]
    count = crow[rows + 1] - start
    new_crow = torch.zeros(rows.numel() + 1, dtype=torch.long, device=device)
    new_crow[1:] = torch.cumsum(count, 0)
    row_of = torch.repeat_interleave(torch.arange(rows.numel(), device=device), count)
    position = start[row_of] + torch.arange(row_of.numel(), device=device) - new_crow[:-1][row_of]
    return new_crow, col[position], values[position].to(torch.float32)


def _transpose(crow, col, values, shape, use_scipy: bool | None = None) -> torch.Tensor:
    """The transpose of a CSR matrix given as parts, as a CSR tensor (scipy on CPU, a stable sort elsewhere)."""
    n_rows, n_cols = shape
    if use_scipy if use_scipy is not None else (_SCIPY_ON_CPU and values.device.type == "cpu"):
        t = sp.csr_matrix((values.numpy(), col.numpy(), crow.numpy()), shape=shape).T.tocsr()
        return _csr(torch.from_numpy(t.indptr), torch.from_numpy(t.indices), torch.from_numpy(t.data), (n_cols, n_rows))
    device = values.device
    col = col.long()
    row_of = torch.repeat_interleave(torch.arange(n_rows, device=device), (crow[1:] - crow[:-1]).long())
    order = torch.sort(col, stable=True).indices
    t_crow = torch.zeros(n_cols + 1, dtype=torch.long, device=device)
    t_crow[1:] = torch.cumsum(torch.bincount(col, minlength=n_cols), 0)
    return _csr(t_crow, row_of[order], values[order], (n_cols, n_rows))


def _row_max(matrix: torch.Tensor) -> torch.Tensor:
    """Largest value of each row of a CSR tensor with non-negative values (0 for empty rows)."""
    return torch.segment_reduce(matrix.values(), "max", offsets=matrix.crow_indices(), initial=0.0)


def neighbour_pairs(bixel_beam: np.ndarray, bixel_position_mm: np.ndarray, bixel_width_mm: float) -> np.ndarray:
    """(n_pairs, 2) bixel indices of horizontally or vertically adjacent bixels of the same beam."""
    beam = np.asarray(bixel_beam, dtype=np.int64)
    position = np.asarray(bixel_position_mm, dtype=float)
    if beam.size == 0:
        return np.zeros((0, 2), np.int64)
    cells = np.zeros((beam.size, 2), np.int64)
    for b in np.unique(beam):
        own = beam == b
        cells[own] = np.rint((position[own] - position[own].min(axis=0)) / bixel_width_mm).astype(np.int64)
    span = cells.max(axis=0) + 2  # a spare column/row so that a step of +1 never wraps into the next row/beam
    key = (beam * span[1] + cells[:, 1]) * span[0] + cells[:, 0]
    order = np.argsort(key)
    sorted_key = key[order]
    if np.any(np.diff(sorted_key) == 0):
        raise ValueError("two bixels of one beam share a lattice position; check bixel_position_mm and the bixel width")
    pairs = []
    for step in (1, span[0]):  # right neighbour, lower neighbour
        at = np.minimum(np.searchsorted(sorted_key, key + step), sorted_key.size - 1)
        found = sorted_key[at] == key + step
        pairs.append(np.stack([np.flatnonzero(found), order[at[found]]], axis=1))
    return np.concatenate(pairs).astype(np.int64)


def _check_voxels(influence: DoseInfluence, terms: Sequence[ObjectiveTerm]) -> None:
    """ValueError naming the structure whose objective voxels lie outside the working grid."""
    n_voxels = int(influence.matrix.shape[0])
    for term in terms:
        if int(term.voxels.min()) < 0 or int(term.voxels.max()) >= n_voxels:
            raise ValueError(f"voxel indices of the objective on '{term.structure}' lie outside the working grid "
                             f"({n_voxels} voxels)")


def uniform_initial_weights(influence: DoseInfluence, objectives: Sequence[ObjectiveTerm],
                            prescription_gy: float | None = None,
                            target_voxels: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """Equal weights scaled so that the mean dose of the target voxels equals the prescription.
    By default the target is the term with the highest dose its voxels must reach (under-dose, deviation,
    min-DVH or two-sided mimicking term) and that dose is the prescription."""
    device = influence.matrix.device
    if target_voxels is None:
        goals = [(term.lower_dose_goal(), i) for i, term in enumerate(objectives)]
        goals = [(goal, i) for goal, i in goals if goal is not None and goal > 0]
        if not goals:
            raise ValueError("no objective states a dose to reach: pass prescription_gy and target_voxels, "
                             "or initial_weights")
        goal, best = max(goals)
        target_voxels = objectives[best].voxels
        prescription_gy = goal if prescription_gy is None else prescription_gy
    elif prescription_gy is None:
        raise ValueError("give prescription_gy with target_voxels")
    target = torch.as_tensor(np.asarray(target_voxels) if isinstance(target_voxels, np.ndarray) else target_voxels)
    target = torch.unique(target.long())
    n_bixels = int(influence.matrix.shape[1])
    ones = torch.ones(n_bixels, device=device)
    mean_dose = float(torch.mv(_csr(*_csr_parts_of(influence.matrix, target), (target.numel(), n_bixels)), ones)
                      .double().mean())
    if not mean_dose > 0:
        raise ValueError("the beams deliver no dose to the target: check the beam set and the target mask")
    return ones * float(prescription_gy / mean_dose)
