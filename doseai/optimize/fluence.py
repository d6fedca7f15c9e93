"""Fluence-map optimization: non-negative bixel weights that minimise a weighted sum of objective terms.

The problem is  min_w  sum_t priority_t * f_t((A w)[voxels_t]) + smoothness * S(w)   s.t. w >= 0,
with A the dose-influence matrix of a :class:`~doseai.engine.influence.DoseInfluence`. S is the mean
squared difference between neighbouring bixels of the same beam (4-neighbourhood of the bixel lattice)
in units of the initial uniform weight, so ``smoothness`` does not depend on the engine's weight units.

How it is made fast (measured on pyRadPlan's TG-119 matrix, see Testing/benchmarks/bench_optimizer.py):

* Only rows of A that some objective reads are kept, as float32 CSR blocks with int32 indices (MKL and
  cuSPARSE's fast path; int64 indices were 6x slower on CPU), each with its transpose built once, so a
  value+gradient evaluation is sparse matrix-vector products A_b w and A_b^T g plus O(voxels) work.
  The dose gradient of each term is written by hand: autograd through a sparse CSR product was ~100x
  slower on CPU.
* Exact row screening. Terms such as an overdose or a max-DVH objective ignore voxels below a dose
  (:meth:`ObjectiveTerm.inactive_below`). Rows are grouped into blocks of nearby voxels (bricks of 8x8x8
  voxels of the working grid; the dose is smooth, so a brick's voxels are near or far from their limits
  together, and few bixels reach it); each block remembers the weights w_ref at which its dose was last
  computed. As A >= 0, a row's dose can have grown since by at most
  min(||A_i||_2 ||(w - w_ref)^+ on the block's bixels||_2, sum_j max_{i in block} A_ij (w_j - w_ref,j)^+);
  a block whose slack below its limits exceeds that bound provably adds nothing to value or gradient, and
  is skipped in the forward product; the backward product skips every block whose dose gradient is zero.
  Value and gradient are those of the full problem (up to float rounding); on TG-119 about half of the
  non-zeros are left out.
* L-BFGS-B (scipy) on diagonally rescaled variables w = s * u, s_j ~ 1 / sqrt(H_jj) of the Gauss-Newton
  Hessian with all terms active, and a long memory (100 corrections); bounds stay u >= 0.

Solvers: ``"lbfgsb"`` (scipy's L-BFGS-B; torch computes value and gradient, on CPU or CUDA) and ``"adam"``
(projected Adam, all on the device: the choice for CUDA when host round trips matter). Both stop when the
best objective improved by less than ``tolerance`` (relative) over the last ``patience`` iterations, or
after ``max_iterations``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from doseai.engine.influence import DoseInfluence
from doseai.optimize.objectives import ObjectiveTerm

__all__ = ["FluenceResult", "FluenceObjective", "optimize_fluence", "neighbour_pairs", "uniform_initial_weights",
           "SOLVERS"]

SOLVERS = ("lbfgsb", "adam")
_SCIPY_ON_CPU = True  # gather rows and transpose with scipy on CPU (tests switch it off to run the torch path)


@dataclass
class FluenceResult:
    """Outcome of :func:`optimize_fluence`. ``dose`` is the flat float32 dose (n_voxels,) on the working
    grid, ``objective_history`` the objective after each iteration (index 0: the initial weights) and
    ``history_seconds`` when it was reached (seconds since the call started). ``work_fraction``: share of
    the sparse products' non-zeros that screening left to multiply."""

    weights: np.ndarray
    dose: np.ndarray
    shape: tuple[int, int, int]
    objective: float
    objective_history: list[float]
    term_values: list[dict]
    smoothness_value: float
    iterations: int
    evaluations: int
    seconds: float
    stop_reason: str
    solver: str
    timings_s: dict[str, float] = field(default_factory=dict)
    work_fraction: float = 1.0
    history_seconds: list[float] = field(default_factory=list)

    @property
    def dose_image(self) -> np.ndarray:
        """The dose as a float32 (z, y, x) array on the working grid."""
        return self.dose.reshape(self.shape)

    def summary(self) -> dict:
        """JSON-serialisable summary (no arrays)."""
        return {"objective": self.objective, "iterations": self.iterations, "evaluations": self.evaluations,
                "seconds": self.seconds, "stop_reason": self.stop_reason, "solver": self.solver,
                "smoothness_value": self.smoothness_value, "work_fraction": self.work_fraction,
                "timings_s": dict(self.timings_s), "terms": self.term_values}


# --- sparse helpers -------------------------------------------------------------------------------------
def _csr_parts(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _check_voxels(influence: DoseInfluence, terms: Sequence[ObjectiveTerm]):
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


# --- the objective function -----------------------------------------------------------------------------
class FluenceObjective:
    """Value and gradient in the bixel weights of sum_t priority_t f_t + smoothness * S, on the device of
    the influence matrix. Build once; :meth:`value_and_grad` is what a solver calls (with exact row
    screening, see the module docstring); :meth:`value` and :meth:`term_values` evaluate all rows.

    Rows are grouped into blocks of voxels that are close in space (``brick`` voxels (z, y, x) of the
    working grid): the dose is smooth, so a block's rows are below or near their limits together, and
    few bixels reach a compact block, which keeps the screening bounds tight."""

    def __init__(self, influence: DoseInfluence, objectives: Sequence[ObjectiveTerm], smoothness: float = 0.0,
                 weight_scale: float | None = None, brick: tuple[int, int, int] = (8, 8, 8),
                 screening: bool = True):
        if not objectives:
            raise ValueError("give at least one objective term")
        if smoothness < 0:
            raise ValueError(f"smoothness must be >= 0, got {smoothness}")
        start = time.perf_counter()
        self.influence = influence
        self.device = influence.matrix.device
        self.terms = [term.to(self.device) for term in objectives]
        _check_voxels(influence, self.terms)
        self.priorities = [float(term.priority) for term in self.terms]
        self.smoothness = float(smoothness)
        self.weight_scale = weight_scale
        self.screening = screening
        self.evaluations = 0
        self._work = [0, 0]  # non-zeros multiplied, non-zeros of full evaluations

        sorted_rows = torch.unique(torch.cat([term.voxels for term in self.terms]))
        n_rows = sorted_rows.numel()
        n_bixels = int(influence.matrix.shape[1])
        # rows in brick order: brick index (C order of the bricks), then grid order inside a brick
        nz, ny, nx = influence.geometry.shape
        bz, by, bx = (max(1, int(n)) for n in brick)
        k, j, i = sorted_rows // (ny * nx), (sorted_rows // nx) % ny, sorted_rows % nx
        brick_id = ((k // bz) * (-(-ny // by)) + j // by) * (-(-nx // bx)) + i // bx
        order = torch.sort(brick_id, stable=True).indices
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n_rows, device=self.device)
        self.rows = sorted_rows[order]
        self.local = [inverse[torch.searchsorted(sorted_rows, term.voxels)] for term in self.terms]
        # blocks: runs of equal brick id
        brick_id = brick_id[order]
        cuts = (torch.nonzero(brick_id[1:] != brick_id[:-1]).reshape(-1) + 1).tolist()
        bounds = [0] + cuts + [n_rows]
        self.blocks: list[tuple[int, int]] = list(zip(bounds[:-1], bounds[1:]))
        # the dose below which each row adds nothing (-inf: always counts)
        limit = torch.full((n_rows,), math.inf, dtype=torch.float32, device=self.device)
        for term, local in zip(self.terms, self.local):
            below = term.inactive_below()
            if below is None:
                limit[local] = -math.inf
            else:
                below = torch.as_tensor(below, dtype=torch.float32, device=self.device).expand(local.shape)
                limit.scatter_reduce_(0, local, below, "amin")
        self.limit = limit

        crow, col, values = _csr_parts_of(influence.matrix, self.rows)
        index = torch.int32 if max(int(crow[-1]), n_rows, n_bixels) < 2**31 - 1 else torch.int64
        self._crow, self._col, self._values = crow.to(index), col.to(index), values.to(torch.float32)
        self._crow_long = crow.long()
        del crow, col, values
        self.backward: list[torch.Tensor] = []
        self.block_nnz: list[int] = []
        norm2, col_max = [], []
        row_norm2 = torch.segment_reduce(self._values.square(), "sum", offsets=self._crow_long)
        for lo, hi in self.blocks:
            a, b = int(self._crow_long[lo]), int(self._crow_long[hi])
            block_crow = self._crow[lo:hi + 1] - self._crow[lo]
            self.backward.append(_transpose(block_crow, self._col[a:b], self._values[a:b], (hi - lo, n_bixels)))
            self.block_nnz.append(b - a)
            norm2.append(float(row_norm2[lo:hi].max().sqrt()) if hi > lo else 0.0)
            col_max.append(_row_max(self.backward[-1]))
        self.nnz = sum(self.block_nnz)
        n_blocks = len(self.blocks)
        self._block_of_row = torch.repeat_interleave(
            torch.arange(n_blocks, device=self.device),
            torch.tensor([hi - lo for lo, hi in self.blocks], device=self.device))
        self._norm2 = torch.tensor(norm2, dtype=torch.float32, device=self.device)
        self._col_max = torch.stack(col_max)  # (blocks, bixels): largest entry of each column in each block
        self._support = (self._col_max > 0).float()
        finite = self.limit[torch.isfinite(self.limit)]
        self._margin = 1e-4 * (1.0 + (float(finite.abs().max()) if finite.numel() else 0.0))
        self._reference = torch.full((n_blocks, n_bixels), math.nan, device=self.device)
        self._slack = torch.full((n_blocks,), -math.inf, device=self.device)
        self._dose = torch.zeros(n_rows, device=self.device)
        self._n_bixels = n_bixels

        pairs = neighbour_pairs(influence.bixel_beam, influence.bixel_position_mm, influence.beams.bixel_width_mm) \
            if smoothness > 0 else np.zeros((0, 2), np.int64)
        self.pairs = torch.from_numpy(pairs).to(self.device)
        self.setup_seconds = time.perf_counter() - start

    @property
    def n_bixels(self) -> int:
        return self._n_bixels

    @property
    def work_fraction(self) -> float:
        """Share of the non-zeros of full evaluations that screening left to multiply so far."""
        return self._work[0] / self._work[1] if self._work[1] else 1.0

    # --- products ----------------------------------------------------------------------------------------
    def _rows_product(self, lo: int, hi: int, weights: torch.Tensor) -> torch.Tensor:
        """A[lo:hi] w, through a CSR view of those rows."""
        a, b = int(self._crow_long[lo]), int(self._crow_long[hi])
        view = torch.sparse_csr_tensor(self._crow[lo:hi + 1] - self._crow[lo], self._col[a:b], self._values[a:b],
                                       size=(hi - lo, self._n_bixels), check_invariants=False)
        return torch.mv(view, weights)

    def dose_rows(self, weights: torch.Tensor) -> torch.Tensor:
        """Dose of all objective rows (in the order of ``self.rows``) for ``weights``."""
        return self._rows_product(0, self.rows.numel(), weights.to(self.device, torch.float32))

    def _screened_dose(self, weights: torch.Tensor) -> torch.Tensor:
        if self.screening:
            increase = (weights.unsqueeze(0) - self._reference).clamp(min=0)
            bound = torch.minimum(self._norm2 * torch.linalg.vector_norm(increase * self._support, dim=1),
                                  (self._col_max * increase).sum(dim=1))
            compute = ~(self._slack > bound + self._margin)  # NaN reference (never computed) -> compute
        else:
            compute = torch.ones(len(self.blocks), dtype=torch.bool, device=self.device)
        self._reference[compute] = weights
        # one product per run of consecutive blocks to compute
        edges = torch.diff(compute.to(torch.int8), prepend=compute.new_zeros(1, dtype=torch.int8),
                           append=compute.new_zeros(1, dtype=torch.int8))
        starts = torch.nonzero(edges == 1).reshape(-1).tolist()
        stops = torch.nonzero(edges == -1).reshape(-1).tolist()
        for first, stop in zip(starts, stops):
            lo, hi = self.blocks[first][0], self.blocks[stop - 1][1]
            self._dose[lo:hi] = self._rows_product(lo, hi, weights)
            self._work[0] += int(self._crow_long[hi] - self._crow_long[lo])
        self._work[1] += 2 * self.nnz
        gap = self.limit - self._dose
        self._slack = torch.full_like(self._slack, math.inf).scatter_reduce(0, self._block_of_row, gap, "amin")
        return self._dose

    def _smoothness(self, weights: torch.Tensor, with_grad: bool):
        if self.smoothness == 0 or self.pairs.numel() == 0:
            return None, None
        scale = self.weight_scale or 1.0
        diff = (weights[self.pairs[:, 0]] - weights[self.pairs[:, 1]]) / scale
        value = self.smoothness * (diff.double() ** 2).mean()
        if not with_grad:
            return value, None
        coefficient = diff * (2.0 * self.smoothness / (scale * diff.numel()))
        grad = torch.zeros_like(weights)
        grad.index_add_(0, self.pairs[:, 0], coefficient)
        grad.index_add_(0, self.pairs[:, 1], -coefficient)
        return value, grad

    def value_and_grad(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective as a float64 scalar tensor, float32 gradient (n_bixels,)) at ``weights``."""
        self.evaluations += 1
        weights = weights.to(self.device, torch.float32)
        dose = self._screened_dose(weights)
        dose_grad = torch.zeros_like(dose)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for term, local, priority in zip(self.terms, self.local, self.priorities):
            value, grad = term.value_and_grad(dose[local])
            total = total + priority * value
            dose_grad.index_add_(0, local, grad, alpha=priority)
        active = torch.zeros(len(self.blocks), device=self.device).scatter_reduce(
            0, self._block_of_row, (dose_grad != 0).float(), "amax")
        grad_w = torch.zeros(self.n_bixels, device=self.device)
        for b in torch.nonzero(active).reshape(-1).tolist():
            lo, hi = self.blocks[b]
            grad_w += torch.mv(self.backward[b], dose_grad[lo:hi])
            self._work[0] += self.block_nnz[b]
        smooth, smooth_grad = self._smoothness(weights, True)
        if smooth is not None:
            total = total + smooth
            grad_w = grad_w + smooth_grad
        return total, grad_w

    def term_values(self, weights: torch.Tensor | np.ndarray) -> list[dict]:
        """Per term: structure, kind, description, priority, value and priority * value (all rows evaluated)."""
        weights = torch.as_tensor(np.asarray(weights, np.float32) if isinstance(weights, np.ndarray) else weights)
        with torch.no_grad():
            dose = self.dose_rows(weights)
            out = []
            for term, local, priority in zip(self.terms, self.local, self.priorities):
                value = float(term.value(dose[local]))
                out.append({"structure": term.structure, "kind": term.kind, "description": term.describe(),
                            "priority": priority, "value": value, "weighted": priority * value})
        return out

    def smoothness_value(self, weights: torch.Tensor | np.ndarray) -> float:
        weights = torch.as_tensor(np.asarray(weights, np.float32) if isinstance(weights, np.ndarray) else weights)
        smooth, _ = self._smoothness(weights.to(self.device, torch.float32), False)
        return float(smooth) if smooth is not None else 0.0

    def value(self, weights: torch.Tensor | np.ndarray) -> float:
        """The objective at ``weights`` (all rows evaluated)."""
        return sum(t["weighted"] for t in self.term_values(weights)) + self.smoothness_value(weights)

    def diagonal_scaling(self) -> torch.Tensor:
        """s_j = 1/sqrt(H_jj), H = A^T diag(c) A with c_i = sum of 2 priority_t / n_t over the terms of row i
        (the Gauss-Newton Hessian with every term active), normalised to mean 1."""
        weight = torch.zeros(self.rows.numel(), device=self.device)
        for term, local, priority in zip(self.terms, self.local, self.priorities):
            weight.index_add_(0, local, torch.full((local.numel(),), 2.0 * priority / local.numel(),
                                                   device=self.device))
        diagonal = torch.zeros(self.n_bixels, dtype=torch.float64, device=self.device)
        for (lo, hi), block in zip(self.blocks, self.backward):
            squared = torch.sparse_csr_tensor(block.crow_indices(), block.col_indices(), block.values() ** 2,
                                              size=block.shape, check_invariants=False)
            diagonal += torch.mv(squared, weight[lo:hi]).double()
        if self.smoothness > 0 and self.pairs.numel():
            scale = self.weight_scale or 1.0
            per_pair = 2.0 * self.smoothness / (scale**2 * self.pairs.shape[0])
            diagonal.index_add_(0, self.pairs.reshape(-1),
                                torch.full((self.pairs.numel(),), per_pair, dtype=torch.float64, device=self.device))
        top = float(diagonal.max())
        if not top > 0:
            return torch.ones(self.n_bixels, device=self.device)
        scaling = 1.0 / diagonal.clamp(min=top * 1e-6).sqrt()
        return (scaling / scaling.mean()).float()


@contextmanager
def _torch_threads(threads: int | None):
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Stopper:
    """Best objective so far; stop when it improved by less than ``tolerance`` (relative) over ``patience``
    iterations. Relative to the larger of the current value and 1e-6 x the initial one, so that a problem
    whose optimum is 0 (an achievable dose to mimic) stops too."""

    def __init__(self, tolerance: float, patience: int):
        self.tolerance = float(tolerance)
        self.patience = max(1, int(patience))
        self.best: list[float] = []

    def update(self, value: float) -> bool:
        self.best.append(min(value, self.best[-1]) if self.best else value)
        if len(self.best) <= self.patience:
            return False
        old, new = self.best[-1 - self.patience], self.best[-1]
        return (old - new) <= self.tolerance * max(abs(new), 1e-6 * abs(self.best[0]), 1e-30)


def optimize_fluence(
    influence: DoseInfluence,
    objectives: Sequence[ObjectiveTerm],
    smoothness: float = 0.0,
    max_iterations: int = 500,
    tolerance: float = 1e-4,
    patience: int = 10,
    solver: str = "lbfgsb",
    progress: bool = True,
    initial_weights: torch.Tensor | np.ndarray | None = None,
    prescription_gy: float | None = None,
    target_voxels: torch.Tensor | np.ndarray | None = None,
    learning_rate: float = 0.05,
    memory: int = 100,
    precondition: bool = True,
    screening: bool = True,
    threads: int | None = None,
) -> FluenceResult:
    """Optimize non-negative bixel weights of ``influence`` for ``objectives`` (see the module docstring).

    ``tolerance``/``patience``: stop when the best objective improved by less than ``tolerance`` (relative)
    over the last ``patience`` iterations. ``solver``: ``"lbfgsb"`` or ``"adam"`` (projected Adam, step
    ``learning_rate`` times the initial uniform weight, decaying 0.5% per iteration). ``memory``: stored
    L-BFGS-B corrections; ``precondition``: diagonal rescaling of the weights for L-BFGS-B; ``screening``:
    skip rows that provably add nothing. Initial weights (unless given): uniform, scaled so that the mean
    target dose equals the prescription (:func:`uniform_initial_weights`). ``threads``: torch CPU threads
    for the call.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    if max_iterations < 0:
        raise ValueError("max_iterations must be >= 0")
    with _torch_threads(threads):
        start = time.perf_counter()
        terms = [term.to(influence.matrix.device) for term in objectives]
        if not terms:
            raise ValueError("give at least one objective term")
        _check_voxels(influence, terms)
        n_bixels = int(influence.matrix.shape[1])
        uniform = None
        if initial_weights is None or smoothness > 0:
            uniform = uniform_initial_weights(influence, terms, prescription_gy, target_voxels)
        if initial_weights is not None:
            w0 = torch.as_tensor(np.asarray(initial_weights, np.float32) if isinstance(initial_weights, np.ndarray)
                                 else initial_weights).to(influence.matrix.device, torch.float32).clamp(min=0)
            if w0.numel() != n_bixels:
                raise ValueError(f"initial_weights has {w0.numel()} entries, the influence matrix {n_bixels} bixels")
        else:
            w0 = uniform
        problem = FluenceObjective(influence, terms, smoothness,
                                   weight_scale=float(uniform[0]) if uniform is not None else None,
                                   screening=screening)
        setup = time.perf_counter() - start
        clock: list[float] = []
        bar = tqdm(total=max_iterations, desc=f"fluence optimization ({solver})", unit="it", disable=not progress,
                   leave=False)
        try:
            if solver == "lbfgsb":
                scaling = problem.diagonal_scaling() if precondition else torch.ones(n_bixels, device=problem.device)
                weights, history, iterations, reason = _run_lbfgsb(problem, w0, scaling, max_iterations, tolerance,
                                                                   patience, memory, bar, clock)
            else:
                weights, history, iterations, reason = _run_adam(problem, w0, max_iterations, tolerance, patience,
                                                                 learning_rate, bar, clock)
        finally:
            bar.close()
        solve = time.perf_counter() - start - setup
        weights = weights.to(problem.device, torch.float32).clamp(min=0)
        terms_out = problem.term_values(weights)
        smooth = problem.smoothness_value(weights)
        with torch.no_grad():
            dose = influence.dose(weights).float().cpu().numpy()
        seconds = time.perf_counter() - start
    return FluenceResult(
        weights=weights.cpu().numpy().astype(np.float32), dose=dose, shape=tuple(influence.geometry.shape),
        objective=float(sum(t["weighted"] for t in terms_out) + smooth), objective_history=history,
        term_values=terms_out, smoothness_value=smooth, iterations=iterations, evaluations=problem.evaluations,
        seconds=seconds, stop_reason=reason, solver=solver, work_fraction=problem.work_fraction,
        history_seconds=[t - start for t in clock],
        timings_s={"setup": setup, "solve": solve, "matrix_preparation": problem.setup_seconds})


def _single_threaded_blas():
    """L-BFGS-B's BLAS calls are tiny; multi-threaded OpenBLAS spin-waits on a busy machine (measured on
    2 cores with the other core loaded: 45 ms per L-BFGS-B iteration instead of 1.5 ms). Limited to one
    thread when threadpoolctl is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        from contextlib import nullcontext

        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _run_lbfgsb(problem, w0, scaling, max_iterations, tolerance, patience, memory, bar, clock):
    with _single_threaded_blas():
        return _lbfgsb(problem, w0, scaling, max_iterations, tolerance, patience, memory, bar, clock)


def _lbfgsb(problem, w0, scaling, max_iterations, tolerance, patience, memory, bar, clock):
    from scipy.optimize import minimize

    device = problem.device
    s = scaling.double().cpu().numpy()
    scaling = scaling.to(device, torch.float32)
    history: list[float] = []
    stopper = _Stopper(tolerance, patience)
    state = {"reason": None, "best_u": None, "best_f": np.inf}

    def fun(u: np.ndarray):
        value, grad = problem.value_and_grad(torch.from_numpy(u.astype(np.float32)).to(device) * scaling)
        value = float(value)
        if value < state["best_f"]:
            state["best_f"], state["best_u"] = value, u.copy()
        return value, (grad * scaling).double().cpu().numpy()

    def callback(intermediate_result):
        value = float(intermediate_result.fun)
        history.append(value)
        clock.append(time.perf_counter())
        bar.update(1)
        bar.set_postfix(objective=f"{value:.5g}", refresh=False)
        if stopper.update(value):
            state["reason"] = f"converged: objective improved by < {tolerance:g} (relative) over {patience} iterations"
            raise StopIteration

    u0 = w0.double().cpu().numpy() / s
    history.append(fun(u0)[0])
    clock.append(time.perf_counter())
    stopper.update(history[0])
    if max_iterations == 0:
        return w0, history, 0, "max_iterations"
    result = minimize(fun, u0, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * u0.size, callback=callback,
                      options={"maxiter": int(max_iterations), "maxcor": int(memory), "ftol": 0.0, "gtol": 0.0,
                               "maxfun": 20 * int(max_iterations) + 20})
    iterations = len(history) - 1
    if state["reason"] is not None:
        reason = state["reason"]
    elif iterations >= max_iterations:
        reason = "max_iterations"
    else:
        reason = f"L-BFGS-B: {result.message}"
    u = result.x if result.fun <= state["best_f"] else state["best_u"]
    return torch.from_numpy(np.asarray(u * s, np.float32)), history, iterations, reason


def _run_adam(problem, w0, max_iterations, tolerance, patience, learning_rate, bar, clock,
              betas=(0.9, 0.999), decay=0.995):
    w = w0.clone().to(problem.device, torch.float32)
    scale = float(w0.mean()) if float(w0.mean()) > 0 else 1.0
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    stopper = _Stopper(tolerance, patience)
    history: list[float] = []
    best_w, best_f = w.clone(), np.inf
    reason = "max_iterations"
    iterations = 0
    for step in range(1, max_iterations + 2):
        value, grad = problem.value_and_grad(w)
        value = float(value)
        if value < best_f:
            best_f, best_w = value, w.clone()
        history.append(value)
        clock.append(time.perf_counter())
        if step > 1:
            bar.update(1)
            bar.set_postfix(objective=f"{value:.5g}", refresh=False)
            if stopper.update(value):
                reason = f"converged: objective improved by < {tolerance:g} (relative) over {patience} iterations"
                break
        else:
            stopper.update(value)
        if step == max_iterations + 1:
            break
        m.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
        m_hat = m / (1 - betas[0] ** step)
        v_hat = v / (1 - betas[1] ** step)
        lr = learning_rate * scale * decay ** (step - 1)
        w = torch.clamp(w - lr * m_hat / (v_hat.sqrt() + 1e-12 * scale + 1e-30), min=0.0)
        iterations = step
    return best_w, history, iterations, reason
