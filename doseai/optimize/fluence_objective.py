"""The fluence objective sum_t priority_t f_t((A w)[voxels_t]) + smoothness * S(w): value and gradient in
the bixel weights w, made fast (measured on pyRadPlan's TG-119 matrix, see Testing/benchmarks/bench_optimizer.py):

* Only rows of A that some objective reads are kept, as float32 CSR blocks with int32 indices
  (:mod:`doseai.optimize.fluence_setup`), each with its transpose built once, so a value+gradient
  evaluation is sparse matrix-vector products A_b w and A_b^T g plus O(voxels) work. The dose gradient of
  each term is written by hand: autograd through a sparse CSR product was ~100x slower on CPU.
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
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from doseai.engine.influence import DoseInfluence
from doseai.optimize.fluence_setup import _check_voxels, _csr_parts_of, _row_max, _transpose, neighbour_pairs
from doseai.optimize.objectives import ObjectiveTerm


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
        """The number of bixel weights."""
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
        """smoothness * S(weights) (0 without a smoothness term)."""
        weights = torch.as_tensor(np.asarray(weights, np.float32) if isinstance(weights, np.ndarray) else weights)
        smooth, _ = self._smoothness(weights.to(self.device, torch.float32), False)
        return float(smooth) if smooth is not None else 0.0

    def value(self, weights: torch.Tensor | np.ndarray) -> float:
        """The objective at ``weights`` (all rows evaluated)."""
        return sum(t["weighted"] for t in self.term_values(weights)) + self.smoothness_value(weights)

    def diagonal_scaling(self) -> torch.Tensor:
        """s_j = 1/sqrt(H_jj) (:meth:`gauss_newton_diagonal`), normalised to mean 1."""
        diagonal = self.gauss_newton_diagonal()
        top = float(diagonal.max())
        if not top > 0:
            return torch.ones(self.n_bixels, device=self.device)
        scaling = 1.0 / diagonal.clamp(min=top * 1e-6).sqrt()
        return (scaling / scaling.mean()).float()

    def gauss_newton_diagonal(self) -> torch.Tensor:
        """H_jj (float64, n_bixels) of H = A^T diag(c) A with c_i = sum of 2 priority_t / n_t over the terms of
        row i (the Gauss-Newton Hessian with every term active), plus the smoothness term's diagonal."""
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
        return diagonal
