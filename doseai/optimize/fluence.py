"""Fluence-map optimization: non-negative bixel weights that minimise a weighted sum of objective terms.

The problem is  min_w  sum_t priority_t * f_t((A w)[voxels_t]) + smoothness * S(w)   s.t. w >= 0,
with A the dose-influence matrix of a :class:`~doseai.engine.influence.DoseInfluence`. S is the mean
squared difference between neighbouring bixels of the same beam (4-neighbourhood of the bixel lattice)
in units of the initial uniform weight, so ``smoothness`` does not depend on the engine's weight units.

:func:`optimize_fluence` sets the problem up (:mod:`~doseai.optimize.fluence_setup`: matrix rows, initial
weights), evaluates it with :class:`~doseai.optimize.fluence_objective.FluenceObjective` (sparse products
with exact row screening) and runs one of :data:`SOLVERS` (:mod:`~doseai.optimize.fluence_solvers`):
``"lbfgsb"`` (scipy's L-BFGS-B; torch computes value and gradient, on CPU or CUDA) or ``"adam"``
(projected Adam, all on the device: the choice for CUDA when host round trips matter). Both stop when the
best objective improved by less than ``tolerance`` (relative) over the last ``patience`` iterations, or
after ``max_iterations``. ``"learned"``: the shipped learned optimizer (:mod:`~doseai.optimize.learned`)
takes ``max_iterations`` steps (its card says how many it was trained for).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from doseai.engine.influence import DoseInfluence
from doseai.optimize.fluence_objective import FluenceObjective
from doseai.optimize.fluence_setup import _check_voxels, neighbour_pairs, uniform_initial_weights
from doseai.optimize.fluence_solvers import SOLVERS, run_adam, run_lbfgsb
from doseai.optimize.objectives import ObjectiveTerm

__all__ = ["FluenceResult", "FluenceObjective", "optimize_fluence", "neighbour_pairs", "uniform_initial_weights",
           "SOLVERS"]


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


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` for the block (unchanged when None)."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
    learned_network=None,
) -> FluenceResult:
    """Optimize non-negative bixel weights of ``influence`` for ``objectives`` (see the module docstring).

    ``tolerance``/``patience``: stop when the best objective improved by less than ``tolerance`` (relative)
    over the last ``patience`` iterations. ``solver``: ``"lbfgsb"`` or ``"adam"`` (projected Adam, step
    ``learning_rate`` times the initial uniform weight, decaying 0.5% per iteration). ``memory``: stored
    L-BFGS-B corrections; ``precondition``: diagonal rescaling of the weights for L-BFGS-B; ``screening``:
    skip rows that provably add nothing. Initial weights (unless given): uniform, scaled so that the mean
    target dose equals the prescription (:func:`uniform_initial_weights`). ``threads``: torch CPU threads
    for the call. ``learned_network``: the learned optimizer's network (default: the shipped one).
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
        if initial_weights is None or smoothness > 0 or solver == "learned":
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
                weights, history, iterations, reason = run_lbfgsb(problem, w0, scaling, max_iterations, tolerance,
                                                                   patience, memory, bar, clock)
            elif solver == "adam":
                weights, history, iterations, reason = run_adam(problem, w0, max_iterations, tolerance, patience,
                                                                 learning_rate, bar, clock)
            else:
                from doseai.optimize.learned import run_learned

                weights, history, iterations, reason = run_learned(problem, w0, float(uniform[0]), max_iterations,
                                                                    bar, clock, learned_network)
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
